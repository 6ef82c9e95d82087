"""`peftlab export`: merge an adapter and write it as a GGUF file (llama.cpp, Ollama) or a merged HF folder.

The GGUF is written the way llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama: GGUF architecture ``llama`` (for
Mistral too), its tensor names, q/k rows permuted for llama.cpp's rotary layout, and the tokenizer as gpt2-style
BPE. It is written under a temporary name, loaded back with transformers and compared with the merged model on the
fixed batch; only a file within tolerance is renamed to ``--output``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import UserError

if TYPE_CHECKING:  # torch and the model stack load only once the arguments are known to be good
    import numpy as np
    import torch

    from peftlab.merge import Merged

FORMATS = ("gguf", "safetensors")
#: Largest relative logit difference (to the merged model's largest logit) allowed after the GGUF round trip.
#: Measured on tiny-llama and tiny-mistral: f16 2.3e-4, bf16 2.0e-3, q8_0 6.7e-3; pinned with a 7-20x margin.
TOLERANCES = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2}
#: transformers model types whose weights are a GGUF "llama" (Mistral without sliding-window differences).
GGUF_LLAMA_MODEL_TYPES = ("llama", "mistral")
Q8_0_BLOCK = 32


def _check_output(output: Path, overwrite: bool) -> None:
    """A file name to write (its folder is created when the export starts, as `merge` creates its own)."""
    if output.parent.exists() and not output.parent.is_dir():
        raise UserError(f"--output {str(output)!r}: {str(output.parent)!r} is a file, not a folder")
    if output.is_dir():
        raise UserError(f"--output {str(output)!r} is a folder; give a file name such as model-f16.gguf")
    if output.exists() and not overwrite:
        raise UserError(f"--output {str(output)!r} exists; pass --overwrite or choose another name")


def _check_architecture(cfg: Any) -> str:
    """The base model's transformers model type, refused unless it is one the GGUF writer knows."""
    from transformers import AutoConfig

    from peftlab.models import resolve_model_source

    try:
        model_type = AutoConfig.from_pretrained(resolve_model_source(cfg.model),
                                                trust_remote_code=cfg.trust_remote_code).model_type
    except (OSError, ValueError) as exc:
        raise UserError(f"model {cfg.model!r}: cannot read its config ({str(exc).splitlines()[0]})") from None
    if model_type not in GGUF_LLAMA_MODEL_TYPES:
        raise UserError(f"GGUF export supports Llama and Mistral models; {cfg.model!r} is {model_type!r} "
                        "(use --format safetensors)")
    return model_type


def run_export(adapter: str, output: str, fmt: str = "gguf", outtype: str | None = None,
               overrides: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Merge ``adapter`` and write it in ``fmt``; return the report (also saved beside the output)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "safetensors":  # the merged HF folder is exactly `peftlab merge`'s
        from peftlab.merge import run_merge

        if outtype is not None:
            raise UserError("--outtype applies to --format gguf; a safetensors export keeps the model's dtype "
                            "(set it with --precision)")
        return {"format": "safetensors", **run_merge(adapter, output, overrides, overwrite=overwrite)}
    outtype = outtype or "f16"
    if outtype not in TOLERANCES:
        raise UserError(f"--outtype {outtype!r}: expected one of {', '.join(TOLERANCES)}")
    out = Path(output).expanduser().absolute()
    _check_output(out, overwrite)
    from peftlab.merge import merge_adapter, merge_config
    from peftlab.models import release_freed_memory

    path, cfg = merge_config(adapter, overrides)  # in fp32 unless --precision says otherwise
    model_type = _check_architecture(cfg)
    merged = merge_adapter(path, cfg)
    report = merged.report

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}.gguf"  # hidden and unfinished until the rename
    try:
        write_gguf(merged, partial, outtype, name=out.stem)
        ids, reference, tokenizer = merged.ids, merged.logits, merged.tokenizer
        del merged  # the reference logits are computed: free the merged weights before the file loads back
        release_freed_memory()
        check = verify_gguf(partial, ids, reference, tokenizer)
        tolerance = TOLERANCES[outtype]
        report = {**report, "format": "gguf", "outtype": outtype, "model_type": model_type,
                  "output": str(out), "file_size_bytes": partial.stat().st_size, "tolerance_rel": tolerance,
                  "gguf_vs_merged": check["gguf_vs_merged"], "tokenizer_matches": check["tokenizer_matches"]}
        rel = check["gguf_vs_merged"]["max_rel_diff"]
        if not rel <= tolerance:  # `not <=` also catches NaN
            raise UserError(f"GGUF check failed: {outtype} logits differ from the merged model by {rel:.3e} "
                            f"(relative), above the {tolerance:.0e} tolerance; nothing written to {str(out)!r}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _write_gguf_card(path, out, report)
    return report


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py ``LlamaModel.permute``): its rotary embedding pairs
    neighbouring rows, where transformers rotates the two halves of each head. transformers' GGUF reader undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encode(array: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """A tensor in the output type: matrices in f16/bf16/q8_0 (q8_0 only whose rows split into 32-value blocks),
    norms and other 1-D tensors in f32, as llama.cpp keeps them."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if array.ndim < 2:
        return array.astype(np.float32), None
    if outtype == "f16":
        return array.astype(np.float16), None
    if outtype == "bf16":
        return quantize(array, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if array.shape[-1] % Q8_0_BLOCK == 0:
        return quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float32), None


def write_gguf(merged: Merged, target: Path, outtype: str, name: str) -> None:
    """Write the merged model as a GGUF of architecture ``llama``."""
    import gguf
    import torch

    config = merged.model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export supports the default rotary embedding; this model uses {rope['rope_type']!r}")
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, merged.tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in merged.model.state_dict().items():
        if tied and hf_name == "lm_head.weight":  # llama.cpp reuses token_embd when output.weight is absent
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise UserError(f"GGUF export: no GGUF name for tensor {hf_name!r}; this model is not a plain Llama")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if gguf_name.endswith("attn_q"):
            array = _permute(array, n_head, n_head)
        elif gguf_name.endswith("attn_k"):
            array = _permute(array, n_head, n_kv)
        data, raw_dtype = _encode(array, outtype)
        writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for how the text is split before BPE: plain byte-level with GPT-2's regex is ``gpt-2``,
    single digits then byte-level is ``smollm``; anything else gets llama.cpp's ``default`` split (approximate)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", [])
    if [p.get("type") for p in parts] == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    return "default"


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """The tokenizer as gpt2-style BPE: tokens (padded to the model's vocab), token types, merges, special ids,
    add_bos and the chat template (read from the tokenizer's own saved files, as convert_hf_to_gguf.py does)."""
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("GGUF export needs a fast (tokenizer.json) BPE tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_json = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        if tokenizer_json.get("model", {}).get("type") != "BPE":
            raise UserError("GGUF export supports byte-level BPE tokenizers; this one is "
                            f"{tokenizer_json.get('model', {}).get('type')!r}")
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the model's embedding is wider than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # what the tokenizer really does, rather than a flag its config may or may not carry
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token = {"bos": bos is not None and probe[:1] == [bos],
                                 "eos": eos is not None and probe[-1:] == [eos]}
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    if getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


#: Text for the tokenizer round trip: words, a leading space, punctuation and digits.
TOKENIZER_PROBE = " Hello world! The quick brown fox, 12345 times.\nNew line."


def verify_gguf(path: Path, ids: torch.Tensor, reference: torch.Tensor, tokenizer: Any) -> dict[str, Any]:
    """Load the GGUF back with transformers and compare its logits (fp32) on the fixed batch ``ids`` with the
    merged model's ``reference``, and its tokenizer with the merged model's ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.merge import compare, logits_of

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32)
    logits = logits_of(model, ids.to(model.device))
    rebuilt = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    same = rebuilt(TOKENIZER_PROBE)["input_ids"] == tokenizer(TOKENIZER_PROBE)["input_ids"]
    return {"gguf_vs_merged": compare(reference.to(logits.device), logits), "tokenizer_matches": bool(same)}


def _write_gguf_card(adapter: Path, out: Path, report: dict[str, Any]) -> None:
    """``<file>.md`` beside the GGUF (a README.md there may belong to something else): what it is, how it was
    checked."""
    from peftlab.merge import CHECK_BATCH, CHECK_SEED

    diff = report["gguf_vs_merged"]
    lines = [f"# {out.name}", "",
             f"`{report['base_model']}` with the adapter `{adapter}` ({report['method']}) merged in, written as "
             f"GGUF ({report['outtype']}, architecture `llama`) by `peftlab export`.", "",
             f"Check: loaded back with transformers and compared with the merged model on a fixed "
             f"{CHECK_BATCH[0]}x{CHECK_BATCH[1]} batch of random tokens (seed {CHECK_SEED}): max abs logit diff "
             f"{diff['max_abs_diff']:.3e}, relative {diff['max_rel_diff']:.3e} (tolerance "
             f"{report['tolerance_rel']:.0e}). Tokenizer round trip on a sample text: "
             f"{'identical ids' if report['tokenizer_matches'] else 'ids differ'}.", "",
             "Not checked here: llama.cpp or Ollama themselves, or generation quality.", ""]
    Path(f"{out}.md").write_text("\n".join(lines), encoding="utf-8")


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    if report.get("format") == "safetensors":
        from peftlab.merge import format_report as merge_lines

        return merge_lines(report)
    diff = report["gguf_vs_merged"]
    size = report["file_size_bytes"]
    return "\n".join([
        f"exported {report['adapter']} merged into {report['base_model']} -> {report['output']} "
        f"(gguf {report['outtype']}, {size / 2**20:.1f} MiB)",
        f"gguf vs merged model: max abs logit diff {diff['max_abs_diff']:.3e}, relative {diff['max_rel_diff']:.3e} "
        f"(tolerance {report['tolerance_rel']:.0e})",
        f"tokenizer round trip: {'identical ids' if report['tokenizer_matches'] else 'ids DIFFER'}",
    ])
