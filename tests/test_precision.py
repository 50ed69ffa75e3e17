"""The dtype rule: a pure function of the machine's facts, checked on the flag sets of both kinds of CPU we run on."""

import pytest

from selfimprove.config import Config
from selfimprove.errors import UserError
from selfimprove.precision import Machine, announce, choose, cpu_flags, resolve
from selfimprove.recipes import load_config

# /proc/cpuinfo `flags` (shortened to the vector extensions and a few others) of our two kinds of 2-core box.
AVX512_BOX = ("fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512ifma avx512cd avx512bw "
              "avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq")
AVX2_BOX = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi1 bmi2 sha_ni"  # AMD EPYC without AVX-512
SAPPHIRE_RAPIDS = AVX2_BOX + " avx512f avx512bw avx512_fp16 amx_bf16 amx_tile amx_int8"
GRAVITON3 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp sve bf16 i8mm"  # Arm `Features`

cpu = {name: Machine("cpu", frozenset(flags.split())) for name, flags in
       {"avx512": AVX512_BOX, "avx2": AVX2_BOX, "amx": SAPPHIRE_RAPIDS, "arm": GRAVITON3}.items()}
A100 = Machine("cuda", gpu_name="NVIDIA A100", gpu_capability=(8, 0))
T4 = Machine("cuda", gpu_name="Tesla T4", gpu_capability=(7, 5))


@pytest.mark.parametrize(("machine", "rollout", "train"), [
    (cpu["avx512"], "bfloat16", "bf16"),
    (cpu["amx"], "bfloat16", "bf16"),
    (cpu["arm"], "bfloat16", "bf16"),
    (cpu["avx2"], "float32", "fp32"),
    (Machine("cpu"), "float32", "fp32"),  # flags unknown: bf16 counts as emulated
    (A100, "bfloat16", "bf16"),
    (T4, "float32", "fp32"),
])
def test_auto_is_bf16_only_where_native(machine, rollout, train):
    assert choose("rollout.dtype", "auto", machine).value == rollout
    assert choose("train.precision", "auto", machine).value == train


def test_auto_says_why():
    assert choose("rollout.dtype", "auto", cpu["avx512"]).reason == "auto: this CPU computes bfloat16 natively (avx512_bf16)"
    assert choose("train.precision", "auto", cpu["avx2"]).reason == (
        "auto: this CPU has no avx512_bf16 / amx_bf16 / bf16: bfloat16 is emulated")
    assert choose("rollout.dtype", "auto", T4).reason == "auto: Tesla T4 has no bf16 (compute capability 7.5 < 8.0)"


def test_explicit_types_are_kept_and_slow_ones_warned_about():
    fast = choose("rollout.dtype", "float32", cpu["avx512"])
    assert (fast.value, fast.warning) == ("float32", None)
    assert choose("train.precision", "bf16", cpu["avx512"]).warning is None
    slow = choose("train.precision", "bf16", cpu["avx2"])
    assert slow.value == "bf16"
    assert slow.warning.startswith("train.precision=bf16: this CPU has no avx512_bf16 / amx_bf16 / bf16")
    assert slow.warning.endswith("train.precision=auto picks float32 here")
    assert choose("rollout.dtype", "float16", cpu["avx512"]).warning.startswith(
        "rollout.dtype=float16: this CPU has no avx512_fp16 / amx_fp16")
    assert choose("rollout.dtype", "float16", cpu["amx"]).warning is None
    assert choose("rollout.dtype", "float16", T4).warning is None


def test_a_type_the_gpu_cannot_compute_is_refused():
    with pytest.raises(UserError, match=r"^rollout.dtype=bfloat16 cannot run here: Tesla T4 has no bf16 "
                                        r"\(compute capability 7.5 < 8.0\); use rollout.dtype=auto$"):
        choose("rollout.dtype", "bfloat16", T4)


def test_unknown_values_are_refused_at_load_naming_the_key():
    with pytest.raises(UserError, match=r"'rollout.dtype' must be one of auto, bfloat16, float16, float32, got 'bf16'"):
        load_config(None, ["rollout.dtype=bf16"])
    with pytest.raises(UserError, match=r"'train.precision' must be one of auto, bf16, fp32, got 'float16'"):
        load_config(None, ["train.precision=float16"])
    with pytest.raises(UserError, match=r"^train.precision=float16 is unknown: use auto, bf16, fp32$"):
        choose("train.precision", "float16", cpu["avx512"])


def test_resolve_makes_both_keys_concrete_and_keeps_the_rest():
    cfg = Config()
    assert (cfg.rollout.dtype, cfg.train.precision) == ("auto", "auto")
    resolved, (rollout, train) = resolve(cfg, cpu["avx2"])
    assert (resolved.rollout.dtype, resolved.train.precision) == ("float32", "fp32")
    assert (rollout.key, train.key) == ("rollout.dtype", "train.precision")
    assert resolved.rollout.n == cfg.rollout.n and cfg.rollout.dtype == "auto"


def test_cpu_flags_from_cpuinfo_text():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n"
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    assert cpu_flags("") == frozenset()


def test_announce_says_each_choice_once_and_warns_on_stderr(capsys):
    announce((choose("rollout.dtype", "auto", cpu["avx2"]), choose("train.precision", "bf16", cpu["avx2"])))
    out, err = capsys.readouterr()
    assert out == ("selfimprove: computing in rollout.dtype=float32 (auto: this CPU has no avx512_bf16 / amx_bf16 / "
                   "bf16: bfloat16 is emulated); train.precision=bf16 (this CPU has no avx512_bf16 / amx_bf16 / bf16: "
                   "bfloat16 is emulated)\n")
    assert err.startswith("selfimprove: warning: train.precision=bf16: this CPU has no") and err.count("\n") == 1
