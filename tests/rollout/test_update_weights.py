"""A running engine takes a saved model's weights in place and then generates what a fresh engine on that model
generates (issue 37: engines that live for the whole run)."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.engine

PROMPTS = 32
MARK = "TOKENS"


def changed_copy(base: str, folder):
    """`base` with its final norm and its (tied) embeddings scaled, each element or row by its own seeded factor in
    about [0.5, 1.5], saved as the trainer saves a model. One factor for all would leave every argmax as it was;
    the embeddings are also the output layer, so a reload that missed the tie would show."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{base}/{f}", folder)
    weights = load_file(f"{base}/model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name, shape in (("model.norm.weight", None), ("model.embed_tokens.weight", (-1, 1))):
        w = weights[name]
        factor = 1 + 0.5 * torch.randn(w.shape[0], generator=g).clamp(-1, 1)
        weights[name] = (w.float() * (factor if shape is None else factor.view(shape))).to(w.dtype)
    save_file(weights, f"{folder}/model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def tokens(bundled_model, tmp_path_factory):
    """Greedy token ids of 32 held-out arithmetic prompts from one engine as a pool actor runs it (in its own
    process, engine core in process): started on the changed model ("fresh"), then updated in place to the base
    model ("base"), then back to the changed one ("updated"). The same prompts each time: had the prefix cache kept
    the base model's KV, "updated" would reuse it."""
    changed = changed_copy(bundled_model, tmp_path_factory.mktemp("update") / "changed")
    script = textwrap.dedent(f"""
        import json
        from selfimprove.config import RolloutConfig, TaskConfig
        from selfimprove.rollout.engine import build_llm, chat_prompts, sampling_params, update_weights
        from selfimprove.tasks import build_task
        if __name__ == "__main__":
            task = build_task(TaskConfig())
            cfg = RolloutConfig(max_model_len=512, cpu_kvcache_gib=1, max_tokens=32)
            llm = build_llm({str(changed)!r}, cfg, in_process=True)
            prompts = chat_prompts(llm.get_tokenizer(), [task.prompt(r) for r in task.read("test")[:{PROMPTS}]])
            greedy = sampling_params(cfg, 1, 0.0, ())
            def generate():
                return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
            out = {{"fresh": generate()}}
            update_weights(llm, {bundled_model!r})
            out["base"] = generate()
            update_weights(llm, {str(changed)!r})
            out["updated"] = generate()
            print({MARK!r} + json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800)
    line = next((x for x in done.stdout.splitlines() if x.startswith(MARK)), None)
    assert line is not None, done.stderr[-3000:]
    return json.loads(line[len(MARK):])


def test_an_engine_updated_in_place_generates_the_tokens_of_a_fresh_engine(tokens):
    assert len(tokens["updated"]) == PROMPTS
    assert tokens["updated"] == tokens["fresh"]


def test_the_update_changes_what_the_engine_generates(tokens):
    """Without this, the test above would pass for an update that loaded nothing."""
    assert sum(b != f for b, f in zip(tokens["base"], tokens["fresh"], strict=True)) == PROMPTS
