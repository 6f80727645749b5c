"""The private randomness of DP-SGD: unit sampling and Gaussian noise.

The (epsilon, delta) guarantee holds only while the noise is unknown to the attacker. If the
noise came from the recipe's public ``seed``, anyone holding the recipe could regenerate it
and subtract it from the released weights. So the two *private* streams are seeded from OS
entropy (:mod:`secrets`), never from the recipe:

- ``units``: which patients/tiles a step samples (Poisson sampling);
- ``noise``: the Gaussian noise of DP-SGD and of the DP label shares.

Everything non-private (tile draws within a unit, timesteps, diffusion noise, condition
dropout, sampling) stays on the recipe seed, so runs stay reproducible where that is harmless.

The secret seed itself is never written anywhere. The generators' *states* are saved in the
train stage's private ``state/`` folder (``tensors.safetensors``) so that an interrupted run
resumes its own stream exactly; that folder is deleted before the stage is finalised, so it
is never released, and neither the card nor any manifest names the seed.

Tests may inject a seed (keyword ``dp_seed`` of :func:`synthpath.train.trainer.train`, or the
environment variable :data:`TEST_SEED_ENV` for a subprocess). An injected seed is never
silent: the ledger's ``dp_randomness`` says ``"test seed, not private"``, a ledger warning
says so, and the dataset card repeats it.

With ``privacy.secure_mode: true`` both streams come from torchcsprng's CSPRNG instead
(cryptographically secure; its state cannot be saved, so such a run resumes privately but not
bit for bit). Without it the streams are torch PRNGs (Mersenne Twister on the CPU, Philox on
CUDA): secret, but not a CSPRNG and not hardened against floating-point attacks on the
Gaussian sampler; the ledger's ``noise_source`` and the card say so.

Several ranks (torch.distributed): the private streams belong to rank 0 only, which draws the
unit sample and the noise and broadcasts them; other ranks never hold these generators.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets

import torch

from ..pipeline import StageError

log = logging.getLogger("synthpath.train")

TEST_SEED_ENV = "SYNTHPATH_TEST_DP_SEED"
"""Environment variable with an integer: the DP streams' seed, for tests only (recorded)."""

OS_ENTROPY = "secret: seeded from OS entropy (secrets), never saved or released"
TEST_SEED = "test seed, not private"
CSPRNG = "secret: torchcsprng CSPRNG (/dev/urandom)"

PRNG_NOTE = ("DP noise and unit sampling come from a torch PRNG seeded secretly from OS entropy; it is not a "
             "cryptographically secure generator and is not hardened against floating-point attacks on the "
             "Gaussian sampler (privacy.secure_mode: true with torchcsprng is)")
CSPRNG_NOTE = "DP noise and unit sampling come from a cryptographically secure generator (torchcsprng)"
TEST_WARNING = ("the DP noise and unit sampling were seeded with an injected TEST seed (dp_seed / "
                f"{TEST_SEED_ENV}): anyone who knows it can remove the noise, so the stated epsilon does NOT "
                "hold; never release this model or data made from it")


def _os_entropy_seed() -> int:
    """63 bits from the operating system's CSPRNG."""
    return secrets.randbits(63)


def _derive(master: int, stream: str) -> int:
    blob = f"synthpath-dp\x1f{stream}\x1f{int(master)}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def injected_seed_from_env(environ=None) -> int | None:
    """The injected test seed from :data:`TEST_SEED_ENV`, or None; a malformed value is an error."""
    raw = (os.environ if environ is None else environ).get(TEST_SEED_ENV)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise StageError(f"{TEST_SEED_ENV}={raw!r} must be an integer (it is a test-only DP seed)") from None


def private_streams(device: torch.device, *, secure: bool, test_seed: int | None) -> tuple[dict, str, str]:
    """``({"units": gen, "noise": gen}, dp_randomness, noise_source)`` for a private run.

    ``units`` is a CPU generator (Opacus' Poisson sampler draws on the CPU); ``noise`` lives on
    ``device``. ``secure``: torchcsprng for both (raises a StageError naming the key when it
    is missing)."""
    if secure:
        from .privacy import secure_generator

        g = secure_generator()
        if test_seed is not None:
            log.warning("privacy.secure_mode is on: the injected test DP seed is ignored")
        return {"units": g, "noise": g}, CSPRNG, CSPRNG_NOTE
    if test_seed is not None:
        master, source = int(test_seed), TEST_SEED
        log.warning(TEST_WARNING)
    else:
        master, source = _os_entropy_seed(), OS_ENTROPY
    gens = {"units": torch.Generator().manual_seed(_derive(master, "units")),
            "noise": torch.Generator(device=device).manual_seed(_derive(master, "noise"))}
    del master  # the seed lives only in the generators' states from here on
    return gens, source, PRNG_NOTE
