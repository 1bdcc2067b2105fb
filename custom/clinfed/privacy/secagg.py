"""Secure aggregation that holds against a coordinator who lies: the protocol and its messages.

Bonawitz et al. (CCS 2017) double masking, run over FLARE tasks by
:class:`clinfed.workflows.secagg_fedavg.SecAggFedAvg` (server) and
:class:`clinfed.executors.secagg_client.SecAggClient` (each site). This module holds the protocol
itself (messages, checks, masks, shares) and nothing of FLARE.

Keys
----
Each site makes its long-term X25519 key pair itself (``clinfed keys register``) and publishes the
public half on the ledger with its own identity; the contract accepts a site's key only from that
site's organisation. At the start of a job every site pins the registry it reads from its own
ledger client (names, organisations, keys): keys registered later apply from the next job on.
The coordinator relays every message but cannot substitute a key: everything one site sends
another is encrypted and authenticated (ChaCha20-Poly1305) under a key derived from the two
registered long-term keys.

One round, three stages (the site refuses, naming the reason, whenever a check fails)
---------------------------------------------------------------------------------------
(The workflow carries round r + 1's setup request on round r's unmask request, so a round costs
FLARE two tasks once the first is set up; the stages and their checks are the same.)

``RoundContext`` = job, round, participant list U1, threshold t, encoding (below); its hash
``context_id`` binds every message and every mask to it.

1. **setup** (task ``secagg_setup``, server -> U1). A site checks U1 against its pinned registry
   and its policy (:func:`check_context`): every name a registered site with a key; one
   organisation per name, never the coordinator's; itself listed; at least its own minimum of
   sites; t at least its own minimum threshold (default: more than half of U1), and no more than
   U1; the encoding one its policy accepts. It then draws a fresh ephemeral X25519 key pair (c)
   and a self-mask seed (b), Shamir-shares both secrets t-of-|U1| (pycryptodome), and returns,
   for every other listed site v, v's two shares and its own ephemeral public key, encrypted to v
   (``SetupMessage``), plus a hash commitment to b.
2. **masked input** (task ``train``, server -> U2, the sites whose setup arrived). The task
   carries U2 and, per recipient, the ciphertexts of the other U2 members. A site checks U2 is
   U1 less dropped sites (never an added one), still large enough, and that every ciphertext
   decrypts and authenticates as coming from its sender for this context. It trains, then sends
       y = q + PRG(b) + sum_{v in U2, v > me} PRG(s_mv) - sum_{v in U2, v < me} PRG(s_vm)  (mod 2^32)
   where q is the encoded update and s_mv the secret of the two ephemeral keys. Each site masks at
   most once per (job, round).
3. **unmask** (task ``secagg_unmask``, server -> U3, the sites whose masked input arrived). A site
   answers once per (job, round), and only if U3 is U2 less dropped sites, includes itself and is
   still at least t and its minimum: for each v in U3 it reveals its share of v's self-mask seed,
   for each u in U2 - U3 its share of u's ephemeral key, never both for one site. From t answers
   the server rebuilds the survivors' seeds and the dropped sites' ephemeral keys, removes every
   mask, and is left with sum_{v in U3} q_v.

What the coordinator can and cannot learn
-----------------------------------------
It sees ciphertexts, masked inputs (uniform in the ring alone) and the sum over U3 once the round
opens, with the sites' clear weights. To read one site's update it would need that site's
self-mask seed and all of its pairwise masks: the seed from t sites that call the site a survivor,
the masks from t sites that call it dropped (or from t sites per peer that call every peer
dropped, which leaves a list of one, refused). Each honest site answers once per round and
t > |U1| / 2, so no honest majority gives it both. A fake name, two names of one organisation, a
coordinator-owned name or a list below a site's minimum is refused before anything is sent; a
"dropout" claimed after every input arrived, or an input that arrives after recovery, stays
hidden behind its self-mask. Assumptions: the sites' own software is clinfed (trusted site
software), and at least t listed sites are honest; sites that collude with the coordinator
lower what it takes to isolate an honest site to the sum of the honest ones.

Encodings (``Encoding``), both in Z_2^32 with exact wrap-around
---------------------------------------------------------------
- ``exact``: each coordinate clipped to [-c, c], pre-scaled by the site's weight w and rounded:
  q = round(w x s), s = (2^31 - 1 - N) / (c W), W >= sum of weights, so the signed sum is exact.
- ``dp`` (update-level DP inside the mask): the site clips its whole update to L2 norm C, scales
  it by w / W and s, rounds, and adds Skellam noise (difference of two Poisson draws from a
  generator seeded by ``secrets``), an integer distribution closed under addition. With
  ``distributed`` noise each site adds variance (sigma s C)^2 / t, so the sum over the >= t
  survivors carries at least (sigma s C)^2: the server only ever sees a noised sum. With ``local``
  noise the site adds all of it itself (it then trusts no other site). The site-level epsilon of a
  round follows Agarwal, Kairouz & Liu (NeurIPS 2021), see :func:`skellam_noise_multiplier`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clinfed.privacy.errors import KeyDirectoryError, SecAggRefused

PROTOCOL = "clinfed-secagg/1"
META_KEY = "clinfed_secagg"  # the protocol's part of a task's or a result's DXO meta
SETUP_TASK = "secagg_setup"
UNMASK_TASK = "secagg_unmask"
STAGE_SETUP, STAGE_MASKED_INPUT, STAGE_UNMASK = "setup", "masked_input", "unmask"
# Header of a site's error reply that says why it refused a stage.
REFUSAL_HEADER = "clinfed_secagg_refused"
ENCODINGS = ("exact", "dp")
NOISE_MODES = ("distributed", "local")
_HALF_RING = 2**31
_KEY_BYTES = 32
_TAIL_SIGMAS = 12  # the dp encoding's range covers the noise up to 12 standard deviations
# The dp encoding's noise std on the sum, in ring units, is at most this: each site's Poisson draws
# then have a mean of at most 5e11. NumPy's Poisson sampler keeps its variance within 0.1% up to
# about 1e13 and loses it above (measured: 0.90 of the mean at 9e14), and DP needs all of it.
_MAX_NOISE_STD = 1e6


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _hkdf(secret: bytes, *info) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=_canonical([PROTOCOL, *info])).derive(
        secret)


# -- long-term site keys --------------------------------------------------------------------

def generate_private_key_file(path: str | os.PathLike) -> bytes:
    """Create a site's X25519 private key (PKCS#8 PEM, mode 0600) and return its raw public key,
    the value the site registers on the ledger."""
    path = Path(path)
    if path.exists():
        raise KeyDirectoryError(f"{path}: already exists; refusing to overwrite a site's masking key")
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return public_key_bytes(key)


def load_private_key(path: str | os.PathLike) -> X25519PrivateKey:
    """A site's X25519 private key (PKCS#8 PEM), refused when others may read the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KeyDirectoryError(f"{path}: cannot read the site's masking private key ({err.strerror})") from err
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyDirectoryError(f"{path}: private key is readable by others; chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise KeyDirectoryError(f"{path}: not a PKCS#8 PEM private key") from err
    if not isinstance(key, X25519PrivateKey):
        raise KeyDirectoryError(f"{path}: holds a {type(key).__name__}, expected an X25519 private key")
    return key


def public_key_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SiteRegistry:
    """What the ledger says about the consortium, pinned by a site at the start of a job.

    ``sites``: site name -> (organisation's MSP ID, raw X25519 public key or None when the site has
    registered none).
    """

    coordinator_msp: str
    sites: Mapping[str, tuple[str, bytes | None]]

    @classmethod
    def from_ledger(cls, ledger) -> "SiteRegistry":
        consortium = ledger.consortium()
        keys = {}
        for site, record in ledger.site_keys().items():
            try:
                raw = base64.b64decode(record.public_key, validate=True)
            except (ValueError, TypeError) as err:
                raise KeyDirectoryError(f"ledger: the registered key of site {site!r} is not base64") from err
            if len(raw) != _KEY_BYTES:
                raise KeyDirectoryError(f"ledger: the registered key of site {site!r} is not 32 bytes")
            keys[site] = raw
        return cls(consortium.coordinator_msp, {site: (msp, keys.get(site)) for site, msp in consortium.sites.items()})

    def public_key(self, site: str) -> bytes:
        entry = self.sites.get(site)
        if entry is None or entry[1] is None:
            raise SecAggRefused(f"{site!r} has no masking key registered before the job started")
        return entry[1]


# -- what a site accepts --------------------------------------------------------------------

@dataclass(frozen=True)
class SecAggPolicy:
    """A site's own floor on secure aggregation (its privacy policy; a job may ask for more).

    Args:
        min_participants: fewest sites a list (and every later, shrunk list) may have.
        min_threshold_fraction: the threshold t must be more than this fraction of the list.
        update_dp: the site's update-level DP: None (none required) or its requirements
            (``noise_multiplier``: least sigma; ``clip_norm``: largest C; ``noise``: distributed
            or local).
    """

    min_participants: int = 3
    min_threshold_fraction: float = 0.5
    update_dp: "UpdateDPRequirement | None" = None

    def __post_init__(self):
        if not isinstance(self.min_participants, int) or self.min_participants < 2:
            raise ValueError(f"min_participants must be an integer >= 2, got {self.min_participants!r}")
        if not 0.5 <= self.min_threshold_fraction < 1:
            raise ValueError(f"min_threshold_fraction must be in [0.5, 1), got {self.min_threshold_fraction!r}")

    def min_threshold(self, n: int) -> int:
        """The smallest t this site accepts for a list of n: strictly more than the fraction."""
        return int(math.floor(self.min_threshold_fraction * n)) + 1


@dataclass(frozen=True)
class UpdateDPRequirement:
    noise_multiplier: float
    clip_norm: float
    noise: str = "distributed"

    def __post_init__(self):
        if not (self.noise_multiplier > 0 and self.clip_norm > 0):
            raise ValueError("update DP needs noise_multiplier > 0 and clip_norm > 0")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"update DP noise must be one of {NOISE_MODES}, got {self.noise!r}")


# -- the round ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoding:
    """How updates become ring elements (see the module docstring).

    ``clip``: per-coordinate range c (exact) or L2 bound C (dp). ``total_weight``: W, a bound on the
    sum of the sites' weights. ``noise_multiplier``: sigma of the noise on the sum (dp only).
    """

    kind: str
    clip: float
    total_weight: float
    noise_multiplier: float = 0.0

    def __post_init__(self):
        if self.kind not in ENCODINGS:
            raise SecAggRefused(f"encoding must be one of {ENCODINGS}, got {self.kind!r}")
        if not (math.isfinite(self.clip) and self.clip > 0 and math.isfinite(self.total_weight)
                and self.total_weight > 0):
            raise SecAggRefused("encoding clip and total_weight must be finite and > 0")
        if (self.kind == "dp") != (self.noise_multiplier > 0) or not math.isfinite(self.noise_multiplier):
            raise SecAggRefused("a dp encoding needs noise_multiplier > 0, an exact one none")

    def scale(self, n: int) -> float:
        """s: the ring holds the sum of n sites' encoded updates (and, for dp, their noise)."""
        if self.kind == "exact":
            return (_HALF_RING - 1 - n) / (self.clip * self.total_weight)
        in_range = (_HALF_RING - 1 - n) / (self.clip * (1 + _TAIL_SIGMAS * self.noise_multiplier * math.sqrt(n)))
        return min(in_range, _MAX_NOISE_STD / (self.noise_multiplier * self.clip))

    def to_meta(self) -> dict:
        return {"kind": self.kind, "clip": float(self.clip), "total_weight": float(self.total_weight),
                "noise_multiplier": float(self.noise_multiplier)}


@dataclass(frozen=True)
class RoundContext:
    job_id: str
    round: int
    participants: tuple[str, ...]
    threshold: int
    encoding: Encoding

    def __post_init__(self):
        participants = tuple(sorted(set(self.participants)))
        if len(participants) != len(self.participants):
            raise SecAggRefused(f"the participant list {list(self.participants)} names a site twice")
        object.__setattr__(self, "participants", participants)
        if not 2 <= self.threshold <= len(participants):
            raise SecAggRefused(f"threshold {self.threshold} must be between 2 and the {len(participants)} "
                                f"listed sites")
        if self.round < 0:
            raise SecAggRefused("round must be >= 0")

    @property
    def context_id(self) -> str:
        return hashlib.sha256(_canonical({"protocol": PROTOCOL, **self.to_meta()})).hexdigest()

    @property
    def scale(self) -> float:
        return self.encoding.scale(len(self.participants))

    def share_index(self, site: str) -> int:
        return self.participants.index(site) + 1  # Shamir share x-coordinates are 1..n

    def to_meta(self) -> dict:
        return {"job_id": self.job_id, "round": int(self.round), "participants": list(self.participants),
                "threshold": int(self.threshold), "encoding": self.encoding.to_meta()}

    @classmethod
    def from_meta(cls, meta) -> "RoundContext":
        try:
            encoding = Encoding(str(meta["encoding"]["kind"]), float(meta["encoding"]["clip"]),
                                float(meta["encoding"]["total_weight"]),
                                float(meta["encoding"].get("noise_multiplier", 0.0)))
            participants = meta["participants"]
            if not isinstance(participants, list) or not all(isinstance(p, str) for p in participants):
                raise SecAggRefused("participants must be a list of site names")
            return cls(str(meta["job_id"]), int(meta["round"]), tuple(participants), int(meta["threshold"]), encoding)
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggRefused(f"malformed round context ({type(err).__name__}: {err})") from None


def check_context(context: RoundContext, *, site: str, job_id: str, registry: SiteRegistry,
                  policy: SecAggPolicy) -> None:
    """Everything a site checks before it takes part in a round (setup stage)."""
    if context.job_id != job_id:
        raise SecAggRefused(f"the round context is for job {context.job_id!r}, this is job {job_id!r}")
    if site not in context.participants:
        raise SecAggRefused(f"this site is not in the participant list {list(context.participants)}")
    owners: dict[str, str] = {}
    for name in context.participants:
        if name not in registry.sites:
            raise SecAggRefused(f"{name!r} is not a registered site of the consortium")
        msp = registry.sites[name][0]
        if msp == registry.coordinator_msp:
            raise SecAggRefused(f"{name!r} belongs to the coordinator's organisation {msp}")
        if msp in owners:
            raise SecAggRefused(f"{owners[msp]!r} and {name!r} belong to one organisation {msp}")
        owners[msp] = name
        registry.public_key(name)
    _check_size(context.participants, "participant list", context, policy)
    if context.threshold < policy.min_threshold(len(context.participants)):
        raise SecAggRefused(f"threshold {context.threshold} of {len(context.participants)} is below this site's "
                            f"minimum {policy.min_threshold(len(context.participants))} (more than "
                            f"{policy.min_threshold_fraction:g} of the list)")
    required = policy.update_dp
    if required is not None:
        encoding = context.encoding
        if encoding.kind != "dp":
            raise SecAggRefused("this site's policy requires update-level DP and the round's encoding has none")
        if encoding.noise_multiplier < required.noise_multiplier or encoding.clip > required.clip_norm:
            raise SecAggRefused(f"the round asks for noise multiplier {encoding.noise_multiplier:g} and clip "
                                f"{encoding.clip:g}; this site's policy requires at least "
                                f"{required.noise_multiplier:g} and at most {required.clip_norm:g}")


def _check_size(names, what: str, context: RoundContext, policy: SecAggPolicy) -> None:
    if len(names) < policy.min_participants:
        raise SecAggRefused(f"the {what} has {len(names)} sites, fewer than this site's minimum of "
                            f"{policy.min_participants}")
    if len(names) < context.threshold:
        raise SecAggRefused(f"the {what} has {len(names)} sites, fewer than the threshold {context.threshold}")


def _shrunk(names, previous, what: str, context: RoundContext, policy: SecAggPolicy, site: str) -> tuple[str, ...]:
    names = tuple(sorted(names))
    added = sorted(set(names) - set(previous))
    if added:
        raise SecAggRefused(f"the {what} adds {added}, which the previous stage did not list; a list may only "
                            f"shrink by dropped sites")
    if len(set(names)) != len(names):
        raise SecAggRefused(f"the {what} names a site twice")
    if site not in names:
        raise SecAggRefused(f"the {what} {list(names)} leaves this site out")
    _check_size(names, what, context, policy)
    return names


# -- secrets, shares, encryption between sites ----------------------------------------------

def _share(secret: bytes, threshold: int, n: int) -> list[bytes]:
    """Shamir shares of a 32-byte secret: two 16-byte halves, shared with the same x-coordinates.
    pycryptodome's scheme works on 16-byte blocks (GF(2^128))."""
    low = Shamir.split(threshold, n, secret[:16], ssss=False)
    high = Shamir.split(threshold, n, secret[16:], ssss=False)
    return [a + b for (_, a), (_, b) in zip(low, high)]


def _combine(shares: Mapping[int, bytes]) -> bytes:
    items = sorted(shares.items())
    return (Shamir.combine([(i, s[:16]) for i, s in items], ssss=False)
            + Shamir.combine([(i, s[16:]) for i, s in items], ssss=False))


def _channel_key(own: X25519PrivateKey, peer_public: bytes, context: RoundContext, sender: str, recipient: str) -> bytes:
    """One key per (context, sender, recipient): each key encrypts exactly one message, so the
    fixed nonce is never reused."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(shared, "share-channel", context.context_id, sender, recipient)


_NONCE = bytes(12)


def _seed_commitment(context: RoundContext, site: str, seed: bytes) -> str:
    return hashlib.sha256(_canonical([PROTOCOL, "self-mask", context.context_id, site]) + seed).hexdigest()


# -- masks ------------------------------------------------------------------------------------

class MaskStream:
    """Expands seeds into masks: ``size`` uniform uint32 values, the AES-256-CTR keystream of a key
    derived from a seed and its context (each derived key drives exactly one stream, so the zero IV
    is never reused). The buffers are reused across the masks of one site's or one round's work:
    at millions of parameters, fresh 20 MB allocations cost more than the cipher."""

    def __init__(self, size: int):
        self.size = size
        self._zeros = bytes(4 * size)
        self._out = bytearray(4 * size + 15)  # update_into wants room for a block's slack

    def expand(self, seed: bytes, *info) -> np.ndarray:
        """The mask (a view of this stream's buffer, valid until the next ``expand``)."""
        key = _hkdf(seed, "mask", *info)
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(self._zeros, self._out)
        return np.frombuffer(self._out, dtype="<u4", count=self.size)

    def pair(self, seed: bytes, context: "RoundContext", a: str, b: str) -> np.ndarray:
        low, high = sorted((a, b))
        return self.expand(seed, "pair", context.context_id, low, high)

    def self_mask(self, seed: bytes, context: "RoundContext", site: str) -> np.ndarray:
        return self.expand(seed, "self", context.context_id, site)


def _pair_seed(own_ephemeral: X25519PrivateKey, peer_ephemeral: bytes) -> bytes:
    return own_ephemeral.exchange(X25519PublicKey.from_public_bytes(peer_ephemeral))


def layout_of(update: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names (sorted) and shapes: the order in which masks cover the parameters."""
    return [(name, tuple(int(s) for s in np.shape(update[name]))) for name in sorted(update)]


def layout_digest(layout) -> str:
    return hashlib.sha256(_canonical([[n, list(s)] for n, s in layout])).hexdigest()


def ring_of(masked: Mapping[str, np.ndarray], layout) -> np.ndarray:
    """A masked input's arrays as one ring vector, in ``layout`` order."""
    if not layout:
        return np.zeros(0, dtype=np.uint32)
    return np.concatenate([np.asarray(masked[name], dtype=np.uint32).ravel() for name, _ in layout])


def unflatten(flat: np.ndarray, layout) -> dict[str, np.ndarray]:
    data, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        data[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return data


# -- encoding ---------------------------------------------------------------------------------

def noise_rng() -> np.random.Generator:
    """Noise from a generator seeded with 128 bits from the OS's CSPRNG (``secrets``), the practice
    the DP libraries recommend; NumPy's default seeding is not meant for secrets."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


@dataclass(frozen=True)
class EncodedUpdate:
    ring: np.ndarray          # uint32
    clipped: int              # 1 if any coordinate (exact) or the norm (dp) was clipped; site log only
    noise_variance: float     # per coordinate, in ring units (0 for exact)


def encode(update: Mapping[str, np.ndarray], layout, weight: float, context: RoundContext,
           noise: str = "distributed", rng: np.random.Generator | None = None) -> EncodedUpdate:
    """The update as ring elements, in ``layout`` order, under the round's encoding (see the module
    docstring). Works parameter by parameter into one ring buffer: at millions of parameters a
    flat float64 copy of the whole update costs more than the encoding."""
    encoding, scale = context.encoding, context.scale
    if not 0 < weight <= encoding.total_weight:
        raise SecAggRefused(f"weight {weight} must be > 0 and <= the round's total_weight {encoding.total_weight}")
    if noise not in NOISE_MODES:
        raise SecAggRefused(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    arrays = [np.asarray(update[name]).ravel() for name, _ in layout]
    extremes = [(float(a.min()), float(a.max())) for a in arrays if a.size]
    if not all(math.isfinite(low) and math.isfinite(high) for low, high in extremes):
        raise SecAggRefused("the update has NaN or infinite values; refusing to encode it")
    if encoding.kind == "exact":
        clipped = int(any(max(-low, high) > encoding.clip for low, high in extremes))
        factor, variance = float(weight) * scale, 0.0
    else:
        norm = math.sqrt(sum(float(np.dot(a, a)) for a in (x.astype(np.float64) for x in arrays)))
        clipped = int(norm > encoding.clip)
        factor = (min(1.0, encoding.clip / norm) if norm > 0 else 1.0) * float(weight) / encoding.total_weight * scale
        divisor = context.threshold if noise == "distributed" else 1
        variance = (encoding.noise_multiplier * scale * encoding.clip) ** 2 / divisor
        rng = rng or noise_rng()
    ring = np.empty(sum(a.size for a in arrays), dtype=np.uint32)
    offset = 0
    for array in arrays:
        values = array.astype(np.float64)  # a private copy, worked on in place
        if encoding.kind == "exact":
            np.clip(values, -encoding.clip, encoding.clip, out=values)
        values *= factor
        np.rint(values, out=values)
        if encoding.kind == "exact":
            # |values| <= 2^31 - 1 - N by the choice of scale: int32 holds them, its bits are the ring's.
            encoded = values.astype(np.int32).view(np.uint32)
        else:
            # Skellam(variance): the difference of two Poisson(variance / 2) draws; wraps into the ring.
            noise_draw = rng.poisson(variance / 2, values.size) - rng.poisson(variance / 2, values.size)
            encoded = (values.astype(np.int64) + noise_draw).astype(np.uint32)
        ring[offset:offset + values.size] = encoded
        offset += values.size
    return EncodedUpdate(ring, clipped, variance)


def decode_sum(total: np.ndarray, weight_sum: float, context: RoundContext) -> np.ndarray:
    """The weighted mean (float32, the model's precision) from the ring sum of the survivors'
    encoded updates (signed read-back)."""
    encoding = context.encoding
    factor = 1.0 / (context.scale * float(weight_sum))
    if encoding.kind == "dp":
        factor *= encoding.total_weight
    mean = np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float32)
    mean *= np.float32(factor)
    return mean


def skellam_noise_multiplier(context: RoundContext, dimension: int) -> float:
    """The Gaussian noise multiplier whose RDP bounds that of one round's Skellam sum at every
    integer order (Agarwal, Kairouz & Liu 2021, Cor. 3.6: for integer alpha,
    eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)),
    with mu the sum's variance (sigma s C)^2 and D1 <= sqrt(d) D2; the second term is at most
    alpha D2^2 / (2 mu) * 3 sqrt(d) / (alpha D2) <= alpha D2^2 / (2 mu) * 3 sqrt(d) / (2 D2)).
    D2 includes rounding: s C + sqrt(d) / 2. Accounted with the ``skellam`` accountant, which
    evaluates this bound at integer orders only."""
    encoding = context.encoding
    sensitivity = context.scale * encoding.clip
    d2 = sensitivity + math.sqrt(dimension) / 2
    surcharge = 1 + 3 * math.sqrt(dimension) / (2 * d2)
    return encoding.noise_multiplier * sensitivity / (d2 * math.sqrt(surcharge))


# -- the site's side of one round -------------------------------------------------------------

@dataclass
class SiteRound:
    """One site's secrets and view of one round; kept in memory only, dropped with the round."""

    context: RoundContext
    site: str
    ephemeral: X25519PrivateKey
    self_seed: bytes
    own_shares: tuple[bytes, bytes]                 # (self-seed share, ephemeral-key share) of its own
    share_senders: tuple[str, ...] = ()             # U2, as the masked-input task stated it
    peer_ephemeral: dict[str, bytes] = field(default_factory=dict)
    peer_shares: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    masked: bool = False
    answered: bool = False


def setup(context: RoundContext, *, site: str, long_term: X25519PrivateKey, registry: SiteRegistry,
          ) -> tuple[SiteRound, dict]:
    """Stage 1 at a site (after :func:`check_context`): fresh secrets, shares encrypted to peers."""
    if public_key_bytes(long_term) != registry.public_key(site):
        raise SecAggRefused("this site's private masking key does not match its key registered on the ledger")
    ephemeral = X25519PrivateKey.generate()
    self_seed = secrets.token_bytes(_KEY_BYTES)
    ephemeral_raw = ephemeral.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                            serialization.NoEncryption())
    n = len(context.participants)
    seed_shares = _share(self_seed, context.threshold, n)
    key_shares = _share(ephemeral_raw, context.threshold, n)
    ephemeral_public = public_key_bytes(ephemeral)
    ciphertexts = {}
    for index, peer in enumerate(context.participants):
        if peer == site:
            continue
        plaintext = _canonical({"context_id": context.context_id, "sender": site, "recipient": peer,
                                "index": index + 1, "ephemeral_public": ephemeral_public.hex(),
                                "self_seed_share": seed_shares[index].hex(), "key_share": key_shares[index].hex()})
        key = _channel_key(long_term, registry.public_key(peer), context, site, peer)
        aad = _canonical([context.context_id, site, peer])
        ciphertexts[peer] = base64.b64encode(ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, aad)).decode()
    own = context.share_index(site) - 1
    state = SiteRound(context, site, ephemeral, self_seed, (seed_shares[own], key_shares[own]))
    message = {"stage": STAGE_SETUP, "context_id": context.context_id, "sender": site,
               "ephemeral_public": ephemeral_public.hex(),
               "self_seed_commitment": _seed_commitment(context, site, self_seed), "ciphertexts": ciphertexts}
    return state, message


def receive_shares(state: SiteRound, *, share_senders, ciphertexts: Mapping[str, str], long_term: X25519PrivateKey,
                   registry: SiteRegistry, policy: SecAggPolicy) -> None:
    """Stage 2 at a site, before masking: U2 checked, every peer's shares decrypted and authenticated."""
    context, site = state.context, state.site
    if state.share_senders:
        raise SecAggRefused(f"a second masked-input task for round {context.round}; this site masks once per round")
    senders = _shrunk(share_senders, context.participants, "list of sites that completed setup", context, policy, site)
    expected = set(senders) - {site}
    if set(ciphertexts) != expected:
        raise SecAggRefused(f"the relayed shares come from {sorted(ciphertexts)}, not from the listed sites "
                            f"{sorted(expected)}")
    for sender in sorted(expected):
        key = _channel_key(long_term, registry.public_key(sender), context, sender, site)
        aad = _canonical([context.context_id, sender, site])
        try:
            plaintext = json.loads(ChaCha20Poly1305(key).decrypt(_NONCE, base64.b64decode(ciphertexts[sender]), aad))
        except (InvalidTag, ValueError, TypeError):
            raise SecAggRefused(f"the shares relayed as {sender!r}'s fail authentication: altered, or not made with "
                                f"{sender!r}'s registered key for this round") from None
        if (plaintext.get("context_id"), plaintext.get("sender"), plaintext.get("recipient"),
                plaintext.get("index")) != (context.context_id, sender, site, context.share_index(site)):
            raise SecAggRefused(f"the shares relayed as {sender!r}'s are for another round, sender or recipient")
        state.peer_ephemeral[sender] = bytes.fromhex(plaintext["ephemeral_public"])
        state.peer_shares[sender] = (bytes.fromhex(plaintext["self_seed_share"]), bytes.fromhex(plaintext["key_share"]))
    state.share_senders = senders


def mask(state: SiteRound, ring: np.ndarray) -> np.ndarray:
    """Stage 2 at a site: the encoded update (uint32, masked in place) plus the self-mask and the
    pairwise masks with U2."""
    if not state.share_senders:
        raise SecAggRefused("no shares were received for this round; cannot mask")
    if state.masked:
        raise SecAggRefused(f"already masked an input for round {state.context.round}; this site masks once per round")
    masked = ring
    stream = MaskStream(masked.size)
    masked += stream.self_mask(state.self_seed, state.context, state.site)  # uint32 wraps: Z_2^32
    for peer in state.share_senders:
        if peer == state.site:
            continue
        pair = stream.pair(_pair_seed(state.ephemeral, state.peer_ephemeral[peer]), state.context, state.site, peer)
        if state.site < peer:
            masked += pair
        else:
            masked -= pair
    state.masked = True
    return masked


def unmask_answer(state: SiteRound, survivors, policy: SecAggPolicy) -> dict:
    """Stage 3 at a site: per listed site, either its self-mask share (survivor) or its ephemeral
    key share (dropped), never both, and only once per round."""
    context, site = state.context, state.site
    if state.answered:
        raise SecAggRefused(f"already answered an unmask request for round {context.round}; a second one "
                            f"could reveal both secrets of a site")
    if not state.masked:
        raise SecAggRefused(f"this site sent no masked input for round {context.round}; nothing to unmask")
    survivors = _shrunk(survivors, state.share_senders, "survivor list", context, policy, site)
    state.answered = True
    seed_shares, key_shares = {}, {}
    for name in state.share_senders:
        own = name == site
        seed_share, key_share = state.own_shares if own else state.peer_shares[name]
        if name in survivors:
            seed_shares[name] = seed_share.hex()
        else:
            key_shares[name] = key_share.hex()
    return {"stage": STAGE_UNMASK, "context_id": context.context_id, "sender": site,
            "index": context.share_index(site), "self_seed_shares": seed_shares, "key_shares": key_shares}


# -- the server's side --------------------------------------------------------------------------

@dataclass
class ServerRound:
    """What the coordinator keeps of one round."""

    context: RoundContext
    setups: dict[str, dict] = field(default_factory=dict)  # U2: sender -> setup message

    @property
    def share_senders(self) -> list[str]:
        return sorted(self.setups)

    def accept_setup(self, sender: str, message: Mapping) -> None:
        if message.get("stage") != STAGE_SETUP or message.get("sender") != sender or \
                message.get("context_id") != self.context.context_id:
            raise SecAggRefused(f"setup message of {sender} is not for this round")
        if sender not in self.context.participants or sender in self.setups:
            raise SecAggRefused(f"setup message of {sender}: not listed, or a second one")
        self.setups[sender] = dict(message)

    def relay(self) -> dict[str, dict[str, str]]:
        """Per recipient in U2, the ciphertexts the other U2 members made for it."""
        senders = self.share_senders
        return {recipient: {sender: self.setups[sender]["ciphertexts"][recipient]
                            for sender in senders if sender != recipient} for recipient in senders}

    def unmask(self, masked_sum: np.ndarray, survivors, answers: Mapping[str, Mapping]) -> np.ndarray:
        """The ring sum of the survivors' encoded updates, from the sum of their masked inputs and
        at least t answers. Raises ``SecAggRefused`` when fewer than t usable answers came back."""
        context = self.context
        survivors = sorted(survivors)
        dropped = sorted(set(self.share_senders) - set(survivors))
        usable = {s: a for s, a in answers.items() if s in survivors and a.get("context_id") == context.context_id
                  and a.get("index") == context.share_index(s)}
        if len(usable) < context.threshold:
            raise SecAggRefused(f"round {context.round}: {len(usable)} unmask answers, fewer than the threshold "
                                f"{context.threshold}; the sum stays masked and nothing is published")
        total = np.array(masked_sum, dtype=np.uint32)
        stream = MaskStream(total.size)
        for name in survivors:
            shares = {int(a["index"]): bytes.fromhex(a["self_seed_shares"][name]) for a in usable.values()
                      if name in a.get("self_seed_shares", {})}
            seed = self._reconstruct(shares, f"self-mask seed of {name}")
            if _seed_commitment(context, name, seed) != self.setups[name]["self_seed_commitment"]:
                raise SecAggRefused(f"round {context.round}: the shares of {name}'s self-mask seed do not match its "
                                    f"commitment (a site sent a wrong share)")
            total -= stream.self_mask(seed, context, name)
        for name in dropped:
            shares = {int(a["index"]): bytes.fromhex(a["key_shares"][name]) for a in usable.values()
                      if name in a.get("key_shares", {})}
            ephemeral = X25519PrivateKey.from_private_bytes(self._reconstruct(shares, f"ephemeral key of {name}"))
            if public_key_bytes(ephemeral).hex() != self.setups[name]["ephemeral_public"]:
                raise SecAggRefused(f"round {context.round}: the shares of {name}'s ephemeral key do not match its "
                                    f"public key (a site sent a wrong share)")
            for survivor in survivors:
                pair = stream.pair(_pair_seed(ephemeral, bytes.fromhex(self.setups[survivor]["ephemeral_public"])),
                                   context, name, survivor)
                # The survivor added +mask if it sorts before the dropped site, -mask otherwise.
                if survivor < name:
                    total -= pair
                else:
                    total += pair
        return total

    def _reconstruct(self, shares: Mapping[int, bytes], what: str) -> bytes:
        if len(shares) < self.context.threshold:
            raise SecAggRefused(f"round {self.context.round}: {len(shares)} shares of the {what}, fewer than the "
                                f"threshold {self.context.threshold}")
        chosen = dict(sorted(shares.items())[:self.context.threshold])
        return _combine(chosen)


def masked_meta(state: SiteRound, *, weight: float, layout) -> dict:
    """The protocol fields of a masked-input result (under ``META_KEY``)."""
    return {"stage": STAGE_MASKED_INPUT, "protocol": PROTOCOL, "context_id": state.context.context_id,
            "sender": state.site, "weight": float(weight), "layout_sha256": layout_digest(layout),
            "share_senders": list(state.share_senders)}


__all__ = ["PROTOCOL", "META_KEY", "SETUP_TASK", "UNMASK_TASK", "RoundContext", "Encoding", "SecAggPolicy",
           "UpdateDPRequirement", "SiteRegistry", "SiteRound", "ServerRound", "check_context", "setup",
           "receive_shares", "mask", "unmask_answer", "encode", "decode_sum", "generate_private_key_file",
           "load_private_key", "public_key_bytes"]
