"""The corpus of malformed inputs: bad adapters, prompts and training files, each with the status it must
get and the words its error message must hold. Builders only (bytes in, request parts out); the HTTP, the
"nothing stored" and the "still healthy" checks live in tests/test_malformed_inputs.py.

Unit tests go deeper on single parsers (tests/test_registry_validation.py: every safetensors header lie;
tests/test_registry_archive.py: every archive trick; tests/test_training_datasets.py: every JSONL rule).
This corpus takes one or more of each class through the whole service.
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import stat
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

AdapterFiles = dict[str, bytes]  # {CONFIG: bytes, WEIGHTS: bytes} of a good adapter

# The limits of the server the corpus runs against (tests/test_malformed_inputs.py builds it with them).
MAX_ADAPTER_BYTES = 2_000_000
MAX_FILE_BYTES = 1_000_000  # over the 256 KiB line limit, so a huge line meets the line limit first
MAX_PROMPT_CHARS = 5_000
MAX_REQUEST_BYTES = 100_000
MAX_MODEL_LEN = 64
MAX_LORA_RANK = 8
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class Upload:
    """A multipart POST /v1/adapters: (filename, bytes) parts and form fields."""

    files: list[tuple[str, bytes]]
    form: dict[str, str] = field(default_factory=lambda: {"name": "malformed"})


@dataclass(frozen=True)
class Malformed:
    id: str
    status: int
    message: str  # a regex the error message must match (re.search, case-insensitive)
    build: Callable[..., Any]  # adapters: (good files) -> Upload; prompts: () -> Body; files: () -> bytes | FileUpload
    param: str | None = None  # when given, the envelope's `param`


# --- adapter builders --------------------------------------------------------------------------------


def parts(files: AdapterFiles, **replace: bytes) -> list[tuple[str, bytes]]:
    return list({**files, **replace}.items())


def tensors_edited(files: AdapterFiles, edit: Callable[[dict], None]) -> bytes:
    from safetensors.torch import load, save

    tensors = load(files[WEIGHTS])
    edit(tensors)
    return save(tensors)


def header_edited(weights: bytes, edit: Callable[[dict], None]) -> bytes:
    """Rewrite the safetensors JSON header and keep the data: lies no writer library would produce."""
    length = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + weights[8 + length :]


def config_edited(files: AdapterFiles, **changes: Any) -> bytes:
    return json.dumps({**json.loads(files[CONFIG]), **changes}).encode()


def torch_checkpoint() -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({Q_A: torch.zeros(4, 64)}, buffer)  # a zip with a pickle inside
    return buffer.getvalue()


def zip_of(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name it was asked to write
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


PAX = tarfile.PAX_FORMAT  # pax headers: what tgz_pax_bomb inflates


def tgz_of(members: list[tuple[str, bytes] | tarfile.TarInfo]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=PAX) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            info = tarfile.TarInfo(member[0])
            info.size = len(member[1])
            tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def tar_link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def zip_symlink(files: AdapterFiles) -> bytes:
    link = zipfile.ZipInfo(WEIGHTS)
    link.create_system = 3  # unix: external_attr holds the mode
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_of([(CONFIG, files[CONFIG]), (link, b"/etc/passwd")])


def zip_with_lying_sizes(files: AdapterFiles) -> bytes:
    """The weights member's headers declare 100 bytes while its deflate stream inflates to the whole file."""
    data = bytearray(zip_of([(CONFIG, files[CONFIG]), (WEIGHTS, files[WEIGHTS])]))
    for signature, size_offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        at = data.rfind(signature)  # the weights are the last member in both tables
        struct.pack_into("<I", data, at + size_offset, 100)
    return bytes(data)


def tgz_pax_bomb(files: AdapterFiles) -> bytes:
    """No member declares a size over the limit: a pax header (text, not a member) inflates instead. With
    little else in the archive, the ratio (200x) trips before the total (2 MB)."""
    padding = tarfile.TarInfo("notes.txt")
    padding.pax_headers = {"comment": "x" * BOMB_BYTES}
    return tgz_of([*files.items(), padding])


def archived(make: Callable, files: AdapterFiles, *extra: Any) -> list[tuple[str, bytes]]:
    suffix = ".zip" if make is zip_of else ".tar.gz"
    return [("adapter" + suffix, make([*files.items(), *extra]))]


def _nan(value: float) -> Callable[[dict], None]:
    def poison(tensors: dict) -> None:
        tensors[Q_B][1, 1] = value

    return poison


def _transpose_a(tensors: dict) -> None:
    tensors[Q_A] = tensors[Q_A].T.contiguous()


def _to_float64(tensors: dict) -> None:
    tensors[Q_A] = tensors[Q_A].double()


def _alias_b_onto_a(header: dict) -> None:
    header[Q_B]["data_offsets"] = header[Q_A]["data_offsets"]
    header[Q_B]["shape"] = header[Q_A]["shape"][::-1]


def _offsets_past_the_end(header: dict) -> None:
    begin, end = header[Q_B]["data_offsets"]
    header[Q_B]["data_offsets"] = [begin + (1 << 40), end + (1 << 40)]


def _lying_length(weights: bytes, length: int) -> bytes:
    return length.to_bytes(8, "little") + weights[8:]


BOMB_BYTES = 5 << 20  # compresses ~1000x: over the 200x ratio and over the 2 MB content limit
NAN, MINUS_INF = float("nan"), float("-inf")


def weights(make: Callable[[AdapterFiles], bytes]) -> Callable[[AdapterFiles], Upload]:
    """The good config beside the weights `make` returns."""
    return lambda f: Upload(parts(f, **{WEIGHTS: make(f)}))


def config(make: Callable[[AdapterFiles], bytes]) -> Callable[[AdapterFiles], Upload]:
    return lambda f: Upload(parts(f, **{CONFIG: make(f)}))


def one_file(filename: str, make: Callable[[AdapterFiles], bytes]) -> Callable[[AdapterFiles], Upload]:
    return lambda f: Upload([(filename, make(f))])


def in_archive(make: Callable, *extra: Any) -> Callable[[AdapterFiles], Upload]:
    """The good adapter in a .zip (make=zip_of) or .tar.gz (make=tgz_of), plus `extra` members."""
    return lambda f: Upload(archived(make, f, *extra))


def _header_length(weights: bytes) -> int:
    return int.from_bytes(weights[:8], "little")


ADAPTER_CASES = [
    # not safetensors: refused by name or by magic bytes, never unpickled
    Malformed("pickle-adapter_model.bin", 400, r"unexpected file 'adapter_model\.bin'.*safetensors only",
              lambda f: Upload([(CONFIG, f[CONFIG]), ("adapter_model.bin", pickle.dumps({Q_A: [0.0]}))]), "files"),
    Malformed("pytorch_model.bin", 400, r"unexpected file 'pytorch_model\.bin'",
              lambda f: Upload([(CONFIG, f[CONFIG]), ("pytorch_model.bin", torch_checkpoint())]), "files"),
    Malformed("pickle-named-safetensors", 400, r"adapter_model\.safetensors: is a pickle file",
              weights(lambda f: pickle.dumps({Q_A: [0.0]}, protocol=4)), WEIGHTS),
    Malformed("torch-zip-named-safetensors", 400, r"torch zip checkpoint \(pickle inside\)",
              weights(lambda f: torch_checkpoint()), WEIGHTS),
    # tensors
    Malformed("wrong-shape", 400, r"lora_A \[128, 4\] / lora_B \[128, 4\] do not fit a \[128 x 128\] weight",
              weights(lambda f: tensors_edited(f, _transpose_a)), WEIGHTS),
    Malformed("nan-weights", 400, r"holds NaN or inf", weights(lambda f: tensors_edited(f, _nan(NAN))), WEIGHTS),
    Malformed("inf-weights", 400, r"holds NaN or inf", weights(lambda f: tensors_edited(f, _nan(MINUS_INF))), WEIGHTS),
    Malformed("float64-weights", 400, r"dtype 'F64' is not one of",
              weights(lambda f: tensors_edited(f, _to_float64)), WEIGHTS),
    # the safetensors container
    Malformed("truncated-safetensors", 400, r"fall outside|truncated", weights(lambda f: f[WEIGHTS][:-64]), WEIGHTS),
    Malformed("safetensors-cut-to-6-bytes", 400, r"not a safetensors file", weights(lambda f: f[WEIGHTS][:6]), WEIGHTS),
    Malformed("header-length-too-long", 400, r"header length \d+ does not fit",
              weights(lambda f: _lying_length(f[WEIGHTS], 1 << 40)), WEIGHTS),
    Malformed("header-length-short", 400, r"header is not valid JSON",
              weights(lambda f: _lying_length(f[WEIGHTS], _header_length(f[WEIGHTS]) - 3)), WEIGHTS),
    Malformed("overlapping-offsets", 400, r"overlaps the previous tensor",
              weights(lambda f: header_edited(f[WEIGHTS], _alias_b_onto_a)), WEIGHTS),
    Malformed("offsets-past-the-end", 400, r"data_offsets .* fall outside",
              weights(lambda f: header_edited(f[WEIGHTS], _offsets_past_the_end)), WEIGHTS),
    Malformed("trailing-bytes", 400, r"bytes after the last tensor", weights(lambda f: f[WEIGHTS] + b"\0" * 8), WEIGHTS),
    # adapter_config.json
    Malformed("config-not-json", 400, r"adapter_config\.json: not valid JSON", config(lambda f: b"{not json"), CONFIG),
    Malformed("config-not-utf8", 400, r"adapter_config\.json: not valid JSON", config(lambda f: b"\xff\xfe{}"), CONFIG),
    Malformed("config-a-list", 400, r"must hold a JSON object", config(lambda f: b"[1, 2]"), CONFIG),
    Malformed("config-nested-too-deep", 400, r"not valid JSON", config(lambda f: b"[" * 50_000 + b"]" * 50_000), CONFIG),
    Malformed("config-dora-without-magnitudes", 400, r"DoRA adapter \(use_dora: true\) has no lora_magnitude_vector",
              config(lambda f: config_edited(f, use_dora=True)), "use_dora"),
    Malformed("config-loha", 400, r"peft_type 'LOHA' is not supported: LoHa",
              config(lambda f: config_edited(f, peft_type="LOHA")), "peft_type"),
    Malformed("config-unknown-kind", 400, r"peft_type must be one of",
              config(lambda f: config_edited(f, peft_type="NEW_THING")), "peft_type"),
    Malformed("config-rank-a-string", 400, r"r and rank_pattern values must be positive integers",
              config(lambda f: config_edited(f, r="4")), CONFIG),
    Malformed("config-huge-rank", 400, rf"rank 1000000000 exceeds this server's max_lora_rank {MAX_LORA_RANK}",
              config(lambda f: config_edited(f, r=10**9)), CONFIG),
    Malformed("config-rank-disagrees", 400, r"has rank 4, config says 2", config(lambda f: config_edited(f, r=2)), "r"),
    Malformed("config-negative-alpha", 400, r"lora_alpha .* positive",
              config(lambda f: config_edited(f, lora_alpha=-8)), CONFIG),
    Malformed("config-unserved-module", 400, r"not listed in target_modules",
              config(lambda f: config_edited(f, target_modules=["q_proj"])), CONFIG),
    # the upload's shape
    Malformed("missing-weights", 400, r"missing adapter_model\.safetensors", one_file(CONFIG, lambda f: f[CONFIG]), WEIGHTS),
    Malformed("missing-config", 400, r"missing adapter_config\.json", one_file(WEIGHTS, lambda f: f[WEIGHTS]), CONFIG),
    Malformed("no-files", 400, r"files: Field required", lambda f: Upload([]), "files"),
    Malformed("files-and-archive", 400, r"either the two adapter files or one archive",
              lambda f: Upload([*parts(f), ("adapter.zip", zip_of(list(f.items())))]), "files"),
    Malformed("bad-name", 400, r"name must match", lambda f: Upload(parts(f), {"name": "../etc"}), "name"),
    Malformed("name-too-long", 400, r"name: String should have at most 63 characters",
              lambda f: Upload(parts(f), {"name": "a" * 64}), "name"),
    Malformed("oversized", 413, rf"larger than {MAX_ADAPTER_BYTES} bytes", weights(lambda f: f[WEIGHTS] + bytes(MAX_ADAPTER_BYTES))),
    # archives
    Malformed("zip-slip", 400, r"points outside the archive", in_archive(zip_of, ("../../evil.txt", b"x"))),
    Malformed("tgz-slip", 400, r"points outside the archive", in_archive(tgz_of, ("a/../../evil.txt", b"x"))),
    Malformed("zip-absolute-path", 400, r"absolute or Windows path", in_archive(zip_of, ("/etc/cron.d/x", b"x"))),
    Malformed("tgz-symlink", 400, r"is a link, device or sparse file",
              one_file("adapter.tgz", lambda f: tgz_of([(CONFIG, f[CONFIG]), tar_link(WEIGHTS, tarfile.SYMTYPE, "/etc")]))),
    Malformed("tgz-hardlink", 400, r"is a link, device or sparse file",
              one_file("adapter.tgz", lambda f: tgz_of([(CONFIG, f[CONFIG]), tar_link(WEIGHTS, tarfile.LNKTYPE, CONFIG)]))),
    Malformed("zip-symlink", 400, r"is a link or device", one_file("adapter.zip", zip_symlink)),
    Malformed("zip-bomb", 413, r"archive contents is \d+ bytes, more than the limit",
              in_archive(zip_of, ("zeros.txt", bytes(BOMB_BYTES)))),
    Malformed("tgz-bomb", 413, r"archive contents is \d+ bytes, more than the limit",
              in_archive(tgz_of, ("zeros.txt", bytes(BOMB_BYTES)))),
    Malformed("tgz-pax-header-bomb", 413, r"decompressed archive is \d+ bytes, more than the limit",
              one_file("adapter.tgz", tgz_pax_bomb)),
    Malformed("tgz-ratio-bomb", 400, r"compression ratio is above 200x \(archive bomb\?\)",
              one_file("adapter.tgz", lambda f: tgz_pax_bomb({CONFIG: f[CONFIG]}))),
    Malformed("zip-sizes-lie", 400, r"corrupt or unsupported zip: Bad CRC-32",
              one_file("adapter.zip", zip_with_lying_sizes)),
    Malformed("zip-duplicate-entries", 400, r"two members have the same name", in_archive(zip_of, (CONFIG, b"{}"))),
    Malformed("tgz-duplicate-entries", 400, r"two members have the same name", in_archive(tgz_of, (WEIGHTS, b"\0"))),
    Malformed("zip-too-many-members", 400, r"more than 16 members",
              in_archive(zip_of, *[(f"x{i}.txt", b"x") for i in range(15)])),
    Malformed("zip-pickle-member", 400, r"pickle-based checkpoint", in_archive(zip_of, ("adapter_model.bin", b"\x80\x04"))),
    Malformed("zip-nan-weights", 400, r"holds NaN or inf",
              one_file("adapter.zip", lambda f: zip_of(parts(f, **{WEIGHTS: tensors_edited(f, _nan(NAN))}))), WEIGHTS),
    Malformed("archive-garbage", 400, r"not a \.tar\.gz, \.tgz or \.zip archive",
              one_file("adapter.tar.gz", lambda f: b"just text")),
    Malformed("tgz-truncated", 400, r"corrupt tar\.gz", one_file("adapter.tgz", lambda f: tgz_of(list(f.items()))[:200])),
    Malformed("archive-nested-too-deep", 400, r"has no adapter_config\.json at its root",
              one_file("adapter.zip", lambda f: zip_of([(f"a/b/{name}", data) for name, data in f.items()]))),
]


# --- prompts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """A POST to a generation route: JSON (`json`) or raw bytes (`raw`, with `content_type`)."""

    path: str
    json: Any = None
    raw: bytes | None = None
    content_type: str = "application/json"


def completion(**fields: Any) -> Callable[[], Body]:
    return lambda: Body("/v1/completions", {"model": "demo", "prompt": "Hello", "max_tokens": 2, **fields})


def chat(**fields: Any) -> Callable[[], Body]:
    messages = [{"role": "user", "content": "hi"}]
    return lambda: Body("/v1/chat/completions", {"model": "demo", "messages": messages, "max_tokens": 2, **fields})


def tgi(inputs: Any = "Hello", **parameters: Any) -> Callable[[], Body]:
    return lambda: Body("/generate", {"inputs": inputs, "parameters": {"max_new_tokens": 2, **parameters}})


def raw(data: bytes, path: str = "/v1/completions", content_type: str = "application/json") -> Callable[[], Body]:
    return lambda: Body(path, raw=data, content_type=content_type)



PROMPT_CASES = [
    # the prompt itself
    Malformed("prompt-empty-token-list", 400, r"prompt", completion(prompt=[]), "prompt"),
    Malformed("prompt-over-max-chars", 400, rf"prompt is {MAX_PROMPT_CHARS + 1} characters long; the limit is {MAX_PROMPT_CHARS}",
              completion(prompt="x" * (MAX_PROMPT_CHARS + 1)), "prompt"),
    Malformed("prompt-over-context", 400, rf"context is {MAX_MODEL_LEN} tokens",
              completion(prompt=list(range(10, 10 + MAX_MODEL_LEN))), "prompt"),
    Malformed("prompt-token-out-of-vocab", 400, r"prompt token ids must be in \[0, \d+\)", completion(prompt=[10**9])),
    Malformed("prompt-lone-surrogate", 400, r"prompt: not valid Unicode: a lone surrogate",
              raw(b'{"model": "demo", "prompt": "a\\ud800"}'), "prompt"),
    Malformed("chat-lone-surrogate", 400, r"not valid Unicode: a lone surrogate",
              raw(b'{"model": "demo", "messages": [{"role": "user", "content": "\\udfff"}]}', "/v1/chat/completions"),
              "messages.0.content"),
    Malformed("tgi-empty-inputs", 400, r"inputs: String should have at least 1 character", tgi(""), "inputs"),
    Malformed("chat-no-messages", 400, r"messages: List should have at least 1 item", chat(messages=[]), "messages"),
    Malformed("chat-unknown-role", 400, r"messages\.0\.role: Input should be",
              chat(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    # sampling parameters
    Malformed("max-tokens-huge", 400, r"plus max_tokens \(18446744073709551616\) exceeds it",
              completion(max_tokens=2**64), "max_tokens"),
    Malformed("max-tokens-zero", 400, r"max_tokens: Input should be greater than or equal to 1",
              completion(max_tokens=0), "max_tokens"),
    Malformed("max-tokens-fraction", 400, r"max_tokens: Input should be a valid integer",
              completion(max_tokens=1.5), "max_tokens"),
    Malformed("tgi-max-new-tokens-huge", 400, r"plus parameters\.max_new_tokens \(100000\) exceeds it",
              tgi(max_new_tokens=100_000),
              "parameters.max_new_tokens"),
    Malformed("temperature-above-2", 400, r"temperature: Input should be less than or equal to 2",
              completion(temperature=2.5), "temperature"),
    Malformed("temperature-negative", 400, r"temperature: Input should be greater than or equal to 0",
              completion(temperature=-1), "temperature"),
    Malformed("temperature-a-word", 400, r"temperature: Input should be a valid number",
              completion(temperature="hot"), "temperature"),
    Malformed("temperature-nan", 400, r"temperature",
              raw(b'{"model": "demo", "prompt": "x", "temperature": NaN}'), "temperature"),
    Malformed("top-p-zero", 400, r"top_p: Input should be greater than 0", completion(top_p=0), "top_p"),
    Malformed("top-p-above-1", 400, r"top_p: Input should be less than or equal to 1", completion(top_p=1.01), "top_p"),
    Malformed("top-k-below-minus-1", 400, r"top_k: Input should be greater than or equal to -1",
              completion(top_k=-2), "top_k"),
    Malformed("n-17", 400, r"n: Input should be less than or equal to 16", completion(n=17), "n"),
    Malformed("n-zero", 400, r"n: Input should be greater than or equal to 1", chat(n=0), "n"),
    Malformed("stop-a-number", 400, r"stop: Input should be a valid string or Input should be a valid list",
              completion(stop=5), "stop"),
    Malformed("stop-too-many", 400, rf"At most {MAX_STOP_SEQUENCES} stop sequences are allowed, got 5",
              completion(stop=list("abcde")), "stop"),
    Malformed("stop-empty-string", 400, r"Stop sequences must not be empty", completion(stop=[""]), "stop"),
    Malformed("stop-token-ids-words", 400, r"stop_token_ids\.0: Input should be a valid integer",
              completion(stop_token_ids=["eos"]),
              "stop_token_ids.0"),
    Malformed("logit-bias-token-out-of-vocab", 400, r"logit_bias token ids must be in",
              completion(logit_bias={"50256": -100}), "logit_bias"),
    Malformed("logit-bias-not-a-map", 400, r"logit_bias: Input should be a valid dictionary",
              completion(logit_bias="ban"), "logit_bias"),
    Malformed("logprobs", 400, r"logprobs: Input should be less than or equal to 5", completion(logprobs=6), "logprobs"),
    Malformed("seed-negative", 400, r"seed: Input should be greater than or equal to 0", completion(seed=-1), "seed"),
    Malformed("seed-over-int64", 400, r"seed: Input should be less than or equal to", completion(seed=2**64), "seed"),
    Malformed("tgi-truncate", 400, r"truncate=5 is not supported", tgi(truncate=5), "parameters.truncate"),
    Malformed("tgi-top-k-negative", 400, r"parameters\.top_k: Input should be greater than or equal to 0",
              tgi(top_k=-1), "parameters.top_k"),
    Malformed("tgi-unknown-parameter", 400, r"parameters\.beam_width: Extra inputs are not permitted",
              tgi(beam_width=4), "parameters.beam_width"),
    # wrong types (strict: not coerced)
    Malformed("max-tokens-a-string", 400, r"max_tokens: Input should be a valid integer", completion(max_tokens="16"), "max_tokens"),
    Malformed("seed-a-bool", 400, r"seed: Input should be a valid integer", completion(seed=True), "seed"),
    Malformed("tgi-seed-a-bool", 400, r"parameters\.seed: Input should be a valid integer", tgi(seed=True), "parameters.seed"),
    Malformed("tgi-flag-a-number", 400, r"parameters\.return_full_text: Input should be a valid boolean",
              tgi(return_full_text=0.0), "parameters.return_full_text"),
    Malformed("model-a-number", 400, r"model: Input should be a valid string", completion(model=7), "model"),
    Malformed("model-unknown", 404, r"The model `acme/nope` does not exist", completion(model="acme/nope"), "model"),
    Malformed("prompt-an-object", 400, r"prompt: Input should be a valid string or Input should be a valid list",
              completion(prompt={"text": "hi"}), "prompt"),
    Malformed("messages-a-string", 400, r"messages: Input should be a valid list", chat(messages="hi"), "messages"),
    Malformed("stream-a-word", 400, r"stream: Input should be a valid boolean", completion(stream="sometimes"), "stream"),
    Malformed("unknown-field", 400, r"best_guess: Extra inputs are not permitted",
              completion(best_guess=True), "best_guess"),
    # the body as a whole
    Malformed("not-json", 400, r"Request body is not valid JSON", raw(b'{"model": "demo", "prompt": ')),
    Malformed("invalid-utf8", 400, r"Request body is not valid UTF-8", raw(b'{"model": "demo", "prompt": "\xff\xfe"}')),
    Malformed("json-array", 400, r"Request body must be a JSON object", raw(b'["demo", "Hello"]')),
    Malformed("json-null", 400, r"Request body must be a JSON object", raw(b"null")),
    Malformed("empty-body", 400, r"Request body is required", raw(b"")),
    Malformed("text-plain", 400, r"Request body must be a JSON object",
              raw(b'{"model": "demo", "prompt": "x"}', content_type="text/plain")),
    Malformed("nested-too-deep", 400, r"Request body cannot be parsed: it nests too deeply",
              raw(b"[" * 50_000 + b"]" * 50_000)),
    Malformed("integer-too-long", 400, r"Request body cannot be parsed: .*digits",
              raw(b'{"model": "demo", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}")),
    Malformed("huge-body", 413, rf"Request body is larger than {MAX_REQUEST_BYTES} bytes",
              completion(prompt="x" * MAX_REQUEST_BYTES)),
    Malformed("huge-chat-body", 413, rf"Request body is larger than {MAX_REQUEST_BYTES} bytes",
              chat(messages=[{"role": "user", "content": "x" * 1000}] * 120)),
]


# --- training files ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileUpload:
    """A multipart POST /v1/files: the `file` part (None: left out) and form fields."""

    data: bytes | None
    form: dict[str, str] = field(default_factory=lambda: {"purpose": "fine-tune"})


GOOD_LINE = b'{"prompt": "Review: fine\\nSentiment:", "completion": " positive"}'


def jsonl(*lines: Any) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def _chat(*messages: dict) -> dict:
    return {"messages": list(messages)}


USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}

DATASET_CASES = [
    Malformed("empty-file", 400, r"file holds no examples", lambda: b"", "file"),
    Malformed("blank-lines-only", 400, r"file holds no examples", lambda: b"\n \n\r\n", "file"),
    Malformed("not-json-line", 400, r"line 2: invalid JSON", lambda: jsonl(GOOD_LINE, b"prompt: hi", GOOD_LINE), "file"),
    Malformed("json-array-line", 400, r"line 1: each line must be a JSON object", lambda: jsonl(b'["hi", "there"]'), "file"),
    Malformed("nested-too-deep-line", 400, r"line 1: invalid JSON: nested too deeply",
              lambda: jsonl(b"[" * 50_000 + b"]" * 50_000), "file"),
    Malformed("missing-completion", 400, r"line 1: 'completion' must be a string", lambda: jsonl({"prompt": "hi"}), "file"),
    Malformed("empty-completion", 400, r"line 1: 'completion' is empty",
              lambda: jsonl({"prompt": "hi", "completion": ""}), "file"),
    Malformed("neither-form", 400, r"line 1: expected 'messages' \(chat\) or 'prompt' and 'completion'",
              lambda: jsonl({"text": "hi"}), "file"),
    Malformed("both-forms", 400, r"either 'messages' or 'prompt'/'completion', not both",
              lambda: jsonl({"prompt": "a", "completion": "b", "messages": [ASSISTANT]}), "file"),
    Malformed("wrong-role", 400, r"line 1: messages\[0\]\.role is 'robot'",
              lambda: jsonl(_chat({"role": "robot", "content": "x"}, ASSISTANT)), "file"),
    Malformed("missing-content", 400, r"messages\[1\]\.content must be a string",
              lambda: jsonl(_chat(USER, {"role": "assistant"})), "file"),
    Malformed("last-not-assistant", 400, r"the last message must be from the assistant",
              lambda: jsonl(_chat(ASSISTANT, USER)), "file"),
    Malformed("weight-a-string", 400, r"weight must be 0 or 1",
              lambda: jsonl(_chat(USER, {**ASSISTANT, "weight": "1"})), "file"),
    Malformed("mixed-forms", 400, r"line 2: a chat \(messages\) example, but line 1 is a prompt/completion",
              lambda: jsonl(GOOD_LINE, _chat(USER, ASSISTANT)), "file"),
    Malformed("huge-line", 400, r"line 2: line is \d+ bytes, more than the limit of 262144 bytes",
              lambda: jsonl(GOOD_LINE, {"prompt": "x" * 300_000, "completion": "y"}), "file"),
    Malformed("not-utf8", 400, r"line 1: not valid UTF-8",
              lambda: b'{"prompt": "\xe9t\xe9", "completion": " ok"}\n', "file"),
    Malformed("utf16-with-bom", 400, r"not valid UTF-8", lambda: jsonl(GOOD_LINE).decode().encode("utf-16"), "file"),
    Malformed("gzipped", 400, r"not valid UTF-8", lambda: gzip.compress(jsonl(GOOD_LINE) * 10), "file"),
    Malformed("lone-surrogate", 400, r"'prompt' is not valid Unicode",
              lambda: b'{"prompt": "\\ud800", "completion": " x"}\n', "file"),
    Malformed("errors-listed-with-line-numbers", 400, r"3 problem\(s\): line 1: .*; line 3: .*; line 4: ",
              lambda: jsonl(b"{", GOOD_LINE, {"prompt": 1, "completion": "x"}, _chat(USER)), "file"),
    Malformed("wrong-purpose", 400, r"purpose must be one of fine-tune, got 'assistants'",
              lambda: FileUpload(jsonl(GOOD_LINE), {"purpose": "assistants"}), "purpose"),
    Malformed("no-purpose", 400, r"purpose: Field required", lambda: FileUpload(jsonl(GOOD_LINE), {}), "purpose"),
    Malformed("no-file-part", 400, r"file: Field required", lambda: FileUpload(None), "file"),
    Malformed("file-as-a-text-field", 400, r"file: Expected UploadFile",
              lambda: FileUpload(None, {"purpose": "fine-tune", "file": GOOD_LINE.decode()}), "file"),
    Malformed("too-big", 413, rf"larger than the limit of {MAX_FILE_BYTES} bytes",
              lambda: jsonl(GOOD_LINE) * (MAX_FILE_BYTES // 60 + 1), "file"),
]
