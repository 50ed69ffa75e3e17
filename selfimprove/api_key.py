"""The API key of `selfimprove serve`: the variable a server reads it from, and the digest it keeps of it.

Apart from `serve` and `gateway`, which both use it: the gateway checks requests' tokens, and the command line
gives it the key (`cli`) without loading the gateway's web stack.
"""

import hashlib

KEY_ENV = "SELFIMPROVE_API_KEY"


def key_digest(key: str) -> str:
    """What a server keeps of its API key: requests' tokens are compared by this digest."""
    return hashlib.sha256(key.encode()).hexdigest()
