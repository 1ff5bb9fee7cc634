"""Reading and writing GGUF files with gguf-py, and llama.cpp's importance-matrix file.

A written GGUF copies every metadata field of its source (architecture, hyper-parameters,
tokenizer) and every tensor it is not given a replacement for, so the output runs wherever the
source ran. Files appear only complete: each is written to a temporary name and renamed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from tqdm.auto import tqdm

from windquant.errors import WindquantError
from windquant.files import temp_path_for

# Block linears by their name inside a decoder block (as transformers names them) -> the
# GGUF name llama.cpp gives them. Q and K rows are permuted between the two layouts for LLaMA,
# but an input column is the same column in both, so per-input-column statistics carry over.
GGUF_LINEAR = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_linear_name(layer: int, proj: str) -> str:
    """The GGUF tensor name of block ``layer``'s linear ``proj`` (transformers' name in the block)."""
    if proj not in GGUF_LINEAR:
        raise WindquantError(
            f"unsupported architecture for GGUF writing: no GGUF name for the block linear {proj!r}; "
            f"supported: {', '.join(GGUF_LINEAR)}"
        )
    return f"blk.{layer}.{GGUF_LINEAR[proj]}.weight"


def open_gguf(path: str | Path) -> GGUFReader:
    try:
        return GGUFReader(Path(path))
    except (OSError, ValueError) as e:
        raise WindquantError(f"cannot read GGUF file {path}: {e}") from None


def dequantized(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor's weights as float32 in numpy order (``[rows, cols]`` for a matrix)."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)


def quantized_bytes(weights: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf-py's quantization of float weights [rows, cols] to ``qtype`` (raw bytes) — only for
    the types gguf-py implements (``types.PYTHON_TYPES``, F16, BF16)."""
    return gguf.quants.quantize(np.ascontiguousarray(weights, dtype=np.float32), qtype)


def write_gguf(
    source: GGUFReader,
    out: str | Path,
    replace: Mapping[str, tuple[np.ndarray, GGMLQuantizationType]],
    file_type: int | None = None,
    progress: bool = True,
) -> None:
    """Write ``source`` to ``out`` with the tensors in ``replace`` (name -> (data, type); data is
    raw bytes for quantized types, values otherwise) substituted; ``file_type`` overrides
    ``general.file_type``. Atomic."""
    arch = source.fields["general.architecture"].contents()
    out = Path(out)
    tmp = temp_path_for(out)
    writer = gguf.GGUFWriter(tmp, arch, endianess=source.endianess)
    for field in source.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        value = file_type if field.name == "general.file_type" and file_type is not None else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    if file_type is not None and "general.file_type" not in source.fields:
        writer.add_file_type(file_type)
    for t in source.tensors:
        data, qtype = replace.get(t.name, (t.data, t.tensor_type))
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_reference(source: GGUFReader, out: str | Path, progress: bool = True) -> None:
    """The source as an F16 GGUF: every matrix dequantized and stored as F16 (vectors, such as
    norms, keep their type) — the reference the quantized files are measured against and the
    input llama-quantize requantizes from."""
    replace = {}
    for t in tqdm(source.tensors, desc="F16 reference", disable=not progress, unit="tensor"):
        if len(t.shape) >= 2 and t.tensor_type != GGMLQuantizationType.F16:
            replace[t.name] = (dequantized(t).astype(np.float16), GGMLQuantizationType.F16)
    write_gguf(source, out, replace, file_type=int(gguf.LlamaFileType.MOSTLY_F16), progress=progress)


def write_imatrix(path: str | Path, values: Mapping[str, np.ndarray], dataset: str, chunks: int) -> None:
    """llama.cpp's importance matrix in its legacy binary form (``llama-quantize --imatrix`` reads
    it): per tensor, the mean of x² of each input column over the calibration tokens.

    Layout (little-endian int32 / float32): n_entries; per entry its name length, the name, the
    call count (1: the values are already means), the value count, the values; then the chunk
    count and the dataset name."""
    out = Path(path)
    tmp = temp_path_for(out)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<i", len(values)))
        for name, vals in values.items():
            raw = name.encode()
            v = np.ascontiguousarray(vals, dtype="<f4")
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 1, v.size) + v.tobytes())
        text = dataset.encode()
        f.write(struct.pack("<ii", chunks, len(text)) + text)
    os.replace(tmp, out)


def write_random_llama(
    path: str | Path, hidden: int = 64, intermediate: int = 160, layers: int = 2, context: int = 256, seed: int = 0
) -> Path:
    """A tiny randomly initialised LLaMA as a GGUF file (F32 tensors, a byte-level GPT-2 tokenizer):
    a model for tests and for benchmarks of the writers on shapes of our choosing (rows that are
    multiples of 256 exercise the k-quants). Matrices are [out, in] in numpy order, as GGUF stores them."""
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    vocab = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(vocab))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    kv = hidden // 2  # 2 of 4 heads

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(len(vocab), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (intermediate, hidden)),
            ("ffn_up", (intermediate, hidden)),
            ("ffn_down", (hidden, intermediate)),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", mat(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
