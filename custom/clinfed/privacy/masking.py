"""Pairwise additive masking (the first layer of Bonawitz et al.'s secure aggregation).

Each pair of participants (a, b), a < b by name, derives a secret from X25519 (a's private key,
b's public key from the ``SiteKeyDirectory``), and from it, with HKDF-SHA256 bound to the job,
round, attempt and the exact participant list, an AES-256 key whose CTR keystream is the pair's mask
m_ab in Z_2^32. Site a sends y_a = q_a + sum_{b > a} m_ab - sum_{b < a} m_ba (mod 2^32), where q_a
is its update pre-scaled by its weight and quantised to fixed point. The masks cancel in
sum_a y_a, so the server recovers sum_a q_a exactly, and nothing of a single site.

Fixed point (documented bound, enforced): every site clips each coordinate of its update x_a
to [-c, c] (c = ``clip_range``) and sends q_a = round(w_a * x_a * s) with w_a = n_samples and

    s = (2^31 - 1 - N) / (c * W)            N = participants, W = ``total_weight`` >= sum_a w_a

so |sum_a q_a| <= 2^31 - 1 and the signed sum read back from Z_2^32 is exact. The server checks
sum_a w_a <= W with the sites' clear n_samples and refuses the round otherwise. The aggregate's
error is rounding only: about sqrt(N / 12) * c / 2^31 * (W / sum_a w_a) per coordinate (<= 1e-9
for c = 1, W = sum w_a, three sites); choose c to cover the updates (after DP noise, if any).

Fresh masks per attempt: the context (job, round, attempt, participants, W, c) goes into the
key derivation, and a site never masks twice under one (job, round, attempt).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clinfed.privacy.errors import KeyDirectoryError, MaskingError

# Task (server -> site): the round's mask context, in the train task's DXO meta (== FLModel.meta on
# the server) or as a task header: {"round": int, "attempt": int, "participants": [site, ...],
# "total_weight": float, "clip_range": float}.
MASK_CONTEXT_KEY = "clinfed_mask_context"
# Result (site -> server): DXO meta describing the masked payload (see ``MaskedUpdate.meta``).
MASKED_META_KEY = "clinfed_masked"
MASK_PROTOCOL = "clinfed-pairwise-mask/1"  # X25519 + HKDF-SHA256 + AES-256-CTR, Z_2^32
RING_BITS = 32
_HALF_RING = 2**31
_KEY_BYTES = 32


# -- keys -------------------------------------------------------------------------------------

@runtime_checkable
class SiteKeyDirectory(Protocol):
    """Where sites' registered X25519 public keys come from (the ledger's site registry in
    production; a JSON file in tests and the simulator)."""

    def public_keys(self) -> dict[str, bytes]:
        """Site name -> 32-byte raw X25519 public key."""


def _parse_public_key(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise KeyDirectoryError(f"{where}: public key must be a hex string, got {type(value).__name__}")
    try:
        raw = bytes.fromhex(value.strip())
    except ValueError as err:
        raise KeyDirectoryError(f"{where}: public key is not hex") from err
    if len(raw) != _KEY_BYTES:
        raise KeyDirectoryError(f"{where}: public key must be {_KEY_BYTES} bytes (64 hex digits), got {len(raw)}")
    return raw


class FileSiteKeyDirectory:
    """Public keys from a JSON file ``{"site-1": "<64 hex digits>", ...}``, re-read on every call
    so a key rotated by the consortium is picked up.

    Args:
        path: the JSON file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def public_keys(self) -> dict[str, bytes]:
        try:
            content = json.loads(self.path.read_text())
        except FileNotFoundError as err:
            raise KeyDirectoryError(f"{self.path}: site key directory not found") from err
        except ValueError as err:
            raise KeyDirectoryError(f"{self.path}: not valid JSON ({err})") from err
        if not isinstance(content, dict) or not content:
            raise KeyDirectoryError(f"{self.path}: expected a JSON object mapping site name to public key hex")
        return {str(site): _parse_public_key(value, f"{self.path}: site {site!r}") for site, value in content.items()}


class LedgerSiteKeyDirectory:
    """Public keys as the sites registered them on the audit ledger (``RegisterSiteKey``, which
    only the site itself may write): the coordinator relays updates but cannot swap a key.

    Args:
        ledger: a ``clinfed.ledger`` client (the site's own).
    """

    def __init__(self, ledger):
        self.ledger = ledger

    def public_keys(self) -> dict[str, bytes]:
        keys = {}
        for site, record in self.ledger.site_keys().items():
            try:
                raw = base64.b64decode(record.public_key, validate=True)
            except (ValueError, TypeError) as err:
                raise KeyDirectoryError(f"ledger: the registered key of site {site!r} is not base64") from err
            keys[site] = _parse_public_key(raw.hex(), f"ledger: site {site!r}")
        if not keys:
            raise KeyDirectoryError("ledger: no site has registered a masking key (`clinfed keys register`)")
        return keys


def write_key_directory(path: str | os.PathLike, keys: Mapping[str, bytes]) -> None:
    """Write a ``FileSiteKeyDirectory`` file."""
    Path(path).write_text(json.dumps({site: raw.hex() for site, raw in sorted(keys.items())}, indent=1))


def generate_private_key_file(path: str | os.PathLike) -> bytes:
    """Create a site's X25519 private key (PKCS#8 PEM, mode 0600) and return its raw public key,
    the value the site registers in the key directory."""
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
    """A site's X25519 private key: PKCS#8 PEM, or 64 hex digits of the raw key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KeyDirectoryError(f"{path}: cannot read the site's masking private key ({err.strerror})") from err
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyDirectoryError(f"{path}: private key is readable by others; chmod 600 it")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = X25519PrivateKey.from_private_bytes(bytes.fromhex(data.decode().strip()))
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise KeyDirectoryError(f"{path}: not an X25519 private key (PKCS#8 PEM or 64 hex digits)") from err
    if not isinstance(key, X25519PrivateKey):
        raise KeyDirectoryError(f"{path}: holds a {type(key).__name__}, expected an X25519 private key")
    return key


def public_key_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- the round's context ----------------------------------------------------------------------

@dataclass(frozen=True)
class MaskContext:
    """Everything the masks of one attempt of one round are bound to. Sent by the server with
    the train task (``to_meta`` under ``MASK_CONTEXT_KEY``); the job id comes from FLARE."""

    job_id: str
    round: int
    attempt: int
    participants: tuple[str, ...]
    total_weight: float
    clip_range: float

    def __post_init__(self):
        participants = tuple(sorted(set(self.participants)))
        if len(participants) != len(self.participants):
            raise MaskingError(f"participant list {list(self.participants)} has duplicates")
        object.__setattr__(self, "participants", participants)
        if len(participants) < 2:
            raise MaskingError(f"masking needs at least 2 participants, got {list(participants)}")
        if int(self.round) < 0 or int(self.attempt) < 0:
            raise MaskingError("round and attempt must be >= 0")
        if not (self.total_weight > 0 and self.clip_range > 0):
            raise MaskingError("total_weight and clip_range must be > 0")

    @property
    def scale(self) -> float:
        """Fixed-point scale s: |sum of all participants' q| <= 2^31 - 1 (see module doc)."""
        return (_HALF_RING - 1 - len(self.participants)) / (float(self.clip_range) * float(self.total_weight))

    def to_meta(self) -> dict:
        return {"round": int(self.round), "attempt": int(self.attempt), "participants": list(self.participants),
                "total_weight": float(self.total_weight), "clip_range": float(self.clip_range)}

    @classmethod
    def from_meta(cls, meta: Mapping, job_id: str) -> "MaskContext":
        if not isinstance(meta, Mapping):
            raise MaskingError(f"{MASK_CONTEXT_KEY} must be a dict, got {type(meta).__name__}")
        missing = [k for k in ("round", "participants", "total_weight", "clip_range") if k not in meta]
        if missing:
            raise MaskingError(f"{MASK_CONTEXT_KEY} lacks {missing}")
        participants = meta["participants"]
        if not isinstance(participants, (list, tuple)) or not all(isinstance(p, str) for p in participants):
            raise MaskingError(f"{MASK_CONTEXT_KEY}['participants'] must be a list of site names")
        return cls(job_id=str(job_id), round=int(meta["round"]), attempt=int(meta.get("attempt", 0)),
                   participants=tuple(participants), total_weight=float(meta["total_weight"]),
                   clip_range=float(meta["clip_range"]))

    @property
    def context_id(self) -> str:
        """Hash binding job, round, attempt, participants and fixed-point parameters."""
        canonical = json.dumps({"protocol": MASK_PROTOCOL, "job_id": self.job_id, **self.to_meta()},
                               sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def layout_of(update: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names (sorted) and shapes: the order in which masks cover the parameters."""
    return [(name, tuple(np.shape(update[name]))) for name in sorted(update)]


def layout_digest(layout: list[tuple[str, tuple[int, ...]]]) -> str:
    return hashlib.sha256(json.dumps([[n, list(s)] for n, s in layout]).encode()).hexdigest()


# -- masks ------------------------------------------------------------------------------------

def pair_key(own_key: X25519PrivateKey, own_site: str, peer_public: bytes, peer_site: str,
             context: MaskContext) -> bytes:
    """The 32-byte AES key of the (own_site, peer_site) mask in ``context``; both sites get the same."""
    shared = own_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted((own_site, peer_site))
    info = json.dumps([MASK_PROTOCOL, context.context_id, low, high]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=hashlib.sha256(context.job_id.encode()).digest(),
                info=info).derive(shared)


_ZEROS = bytearray()
_ZEROS_LOCK = threading.Lock()


def _zero_bytes(nbytes: int) -> memoryview:
    """A shared read-only run of zero bytes to encrypt (no 4-bytes-per-parameter allocation per mask)."""
    global _ZEROS
    with _ZEROS_LOCK:
        if len(_ZEROS) < nbytes:
            _ZEROS = bytearray(nbytes)
        return memoryview(_ZEROS)[:nbytes]


def expand_mask(key: bytes, size: int) -> np.ndarray:
    """``size`` uniform uint32 values: the AES-256-CTR keystream of ``key`` (zero IV: every key is
    derived for exactly one mask, so no counter block is ever reused)."""
    buffer = bytearray(4 * size + 15)  # update_into wants room for a block's slack
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    encryptor.update_into(_zero_bytes(4 * size), buffer)
    return np.frombuffer(buffer, dtype="<u4", count=size)


def quantise(flat: np.ndarray, weight: float, context: MaskContext) -> tuple[np.ndarray, int]:
    """Clip to [-c, c], pre-scale by ``weight`` and round to the ring. Returns (uint32, clipped count)."""
    values = np.array(flat, dtype=np.float64)  # a private copy, worked on in place
    clipped = int(np.count_nonzero(np.abs(values) > context.clip_range))
    np.clip(values, -context.clip_range, context.clip_range, out=values)
    values *= float(weight) * context.scale
    np.rint(values, out=values)
    # |values| <= 2^31 - 1 - N by the choice of scale, so int32 holds them exactly.
    return values.astype(np.int32).view(np.uint32), clipped


def dequantise_sum(total: np.ndarray, weight_sum: float, context: MaskContext) -> np.ndarray:
    """The weighted mean from the ring sum of all participants' q (exact signed read-back)."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / (context.scale * float(weight_sum))


@dataclass(frozen=True)
class MaskedUpdate:
    data: dict[str, np.ndarray]  # uint32 arrays, same names and shapes as the update
    meta: dict                   # goes under MASKED_META_KEY in the result's DXO meta
    clipped: int                 # coordinates clipped to the range (site-side log only: not sent)


def mask_update(update: Mapping[str, np.ndarray], *, weight: float, site: str, private_key: X25519PrivateKey,
                public_keys: Mapping[str, bytes], context: MaskContext, data_kind: str = "WEIGHT_DIFF") -> MaskedUpdate:
    """What ``site`` sends instead of ``update``: its weighted, quantised update plus its pairwise masks."""
    if site not in context.participants:
        raise MaskingError(f"site {site!r} is not in this round's participant list {list(context.participants)}")
    missing = [p for p in context.participants if p not in public_keys]
    if missing:
        raise KeyDirectoryError(f"no registered masking public key for {missing}; every listed participant "
                                f"must be in the site key directory")
    if public_keys[site] != public_key_bytes(private_key):
        raise KeyDirectoryError(f"site {site!r}: the registered public key does not match this site's private key")
    if not weight > 0 or weight > context.total_weight:
        raise MaskingError(f"weight {weight} must be > 0 and <= the round's total_weight {context.total_weight}")
    layout = layout_of(update)
    flat = np.concatenate([np.asarray(update[name], dtype=np.float64).ravel() for name, _ in layout]) \
        if layout else np.zeros(0)
    if not np.all(np.isfinite(flat)):
        raise MaskingError("the update has NaN or infinite values; refusing to mask it")
    masked, clipped = quantise(flat, weight, context)
    for peer in context.participants:
        if peer == site:
            continue
        mask = expand_mask(pair_key(private_key, site, public_keys[peer], peer, context), flat.size)
        # uint32 arithmetic wraps: this is addition in Z_2^32.
        if site < peer:
            masked += mask
        else:
            masked -= mask
    data, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        data[name] = masked[offset:offset + size].reshape(shape)
        offset += size
    meta = {"protocol": MASK_PROTOCOL, "context_id": context.context_id, **context.to_meta(),
            "weight": float(weight), "scale": context.scale, "data_kind": str(getattr(data_kind, "value", data_kind)),
            "layout_sha256": layout_digest(layout)}
    return MaskedUpdate(data=data, meta=meta, clipped=clipped)


def check_masked_meta(meta: Mapping) -> MaskContext:
    """Parse a masked result's meta back into its context (job id carried in ``context_id`` only)."""
    if not isinstance(meta, Mapping) or meta.get("protocol") != MASK_PROTOCOL:
        raise MaskingError(f"not a {MASK_PROTOCOL} update")
    return MaskContext.from_meta(meta, job_id="?")
