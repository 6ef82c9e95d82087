"""Gemma 3 on a tiny random-init model with Gemma's own tokenizer (``tiny-gemma3``): LoRA, QLoRA and full
fine-tuning train and reload with identical logits; the scaled embeddings, the 262k-vocabulary logits (chunked,
never whole), the ``<start_of_turn>`` chat template and the attention implementation are checked; the planner knows
its shape. The real ``gemma3-270m`` (assembled, dequantized and converted once) runs under the slow marker."""

from __future__ import annotations

import math
import os

import pytest
import torch
from method_kit import causal_lm_method_or_skip

from peftlab import train
from peftlab.configure import load_config
from peftlab.evaluate import eval_config, load_for_eval
from peftlab.losses import IGNORE_INDEX, causal_lm_loss_sum, output_head
from peftlab.merge import fixed_batch, logits_of
from peftlab.methods import method_names
from peftlab.models import load_model, tiny_gemma3_config
from peftlab.plan.arch import load_arch
from tests.conftest import tiny_overrides

GEMMA = "tiny-gemma3"
#: Gemma 3's chat template (text turns), as google/gemma-3-270m-it's tokenizer_config.json writes it.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set "
    "loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if message['role'] == "
    "'assistant' -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}{{ message['content'] | "
    "trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}"
    "{%- endif -%}")


def gemma_cfg(**extra):
    return load_config(None, dict(model=GEMMA, precision="fp32", **extra))


FAST_METHODS = ("lora", "qlora", "full")
#: Every registered method: the three of the issue in every run of the suite; the others (about 9 s each, for
#: Gemma's 262k-entry tokenizer) when PEFTLAB_TEST_ALL_METHODS_ON_GEMMA=1, which keeps CI within its time. Each one
#: answers whether the method fits Gemma 3 (a refusal is a skip with the method's reason); test_all_methods.py
#: covers every method on tiny-llama in every run.
ALL_ON_GEMMA = pytest.mark.skipif(not os.environ.get("PEFTLAB_TEST_ALL_METHODS_ON_GEMMA"),
                                  reason="set PEFTLAB_TEST_ALL_METHODS_ON_GEMMA=1 to check every method on Gemma 3")
ALL_METHODS = [pytest.param(n, marks=() if n in FAST_METHODS else (pytest.mark.slow, ALL_ON_GEMMA))
               for n in method_names()]


@pytest.mark.parametrize("name", ALL_METHODS)
def test_trains_and_reloads_with_identical_logits(name, tmp_path, monkeypatch, data_dir):
    method = causal_lm_method_or_skip(name)
    kept = {}
    save = train.save_trained

    def save_and_keep_logits(model, loaded, *args, **kwargs):
        unwrapped = args[2].unwrap_model(model)  # (method, run, accelerator, ...)
        kept["ids"] = fixed_batch(loaded.model.config.vocab_size, loaded.device)
        kept["logits"] = logits_of(unwrapped, kept["ids"])
        return save(model, loaded, *args, **kwargs)

    monkeypatch.setattr(train, "save_trained", save_and_keep_logits)
    record = train.run_training(load_config(None, tiny_overrides(
        tmp_path, model=GEMMA, method=name, max_steps=2, train_subset=8, eval_subset=2, batch_size=2, grad_accum=1,
        eval_before=True, max_new_tokens=2)))
    assert record.model.architecture == "Gemma3ForCausalLM"
    assert record.timing.optimizer_steps == 2
    before, after = record.metrics.before["perplexity"], record.metrics.after["perplexity"]
    assert math.isfinite(after) and after != before  # it trained
    artifact = record.artifact.path
    if method.is_peft:
        _, model = load_for_eval(eval_config(artifact, {}), artifact, "auto")
    else:
        _, model = load_for_eval(eval_config(None, {"model": artifact}), None, "auto")
    tolerance = 1e-4 if method.converts_at_save else 1e-6  # PiSSA saves a plain LoRA of rank 2r
    assert torch.allclose(logits_of(model, kept["ids"]), kept["logits"], atol=tolerance, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_embeddings_stay_scaled_by_sqrt_hidden(precision):
    loaded = load_model(load_config(None, dict(model=GEMMA, precision=precision)))
    embed = loaded.model.get_input_embeddings()
    assert type(embed).__name__ == "Gemma3TextScaledWordEmbedding"
    ids = torch.tensor([[2, 10, 500, 200_000]])
    expected = embed.weight[ids].float() * math.sqrt(loaded.model.config.hidden_size)
    assert torch.allclose(embed(ids).float(), expected, rtol=1e-2 if precision != "fp32" else 1e-6)
    assert loaded.model.get_output_embeddings().weight is embed.weight  # the 262k head is the tied embedding


def test_262k_logits_are_computed_in_chunks_never_whole():
    loaded = load_model(gemma_cfg())
    model = loaded.model
    assert model.config.vocab_size == 262144
    assert not getattr(model.config, "final_logit_softcapping", None)  # so the head is a plain matmul
    head = output_head(model)
    assert head is not None, "the chunked loss must replace Gemma 3's head"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 262144, (2, 24), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    seen = []
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        chunked = causal_lm_loss_sum(model, batch, chunked=True)
    finally:
        hook.remove()
    assert all(shape[1] == 0 for shape in seen), f"the head produced full logits: {seen}"
    full = causal_lm_loss_sum(model, batch, chunked=False)
    assert torch.allclose(chunked, full, rtol=1e-5)


def test_a_softcapped_head_falls_back_to_full_logits():
    """Gemma 2's final-logit soft-capping is not a plain matmul: the chunked loss must step aside, not be wrong."""
    from transformers import AutoModelForCausalLM

    config = tiny_gemma3_config()
    config.final_logit_softcapping = 30.0
    config.vocab_size = 512
    assert output_head(AutoModelForCausalLM.from_config(config)) is None


def test_chat_template_masks_all_but_the_response():
    from peftlab.prompts import Example, PromptEncoder, choose_template

    tok = load_model(gemma_cfg()).tokenizer
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    encoder = PromptEncoder(tok, choose_template("chat", tok), max_length=128)
    enc = encoder.encode(Example(({"role": "user", "content": "Say hi"},), "Hi!"))
    assert enc.prompt == "<bos><start_of_turn>user\nSay hi<end_of_turn>\n<start_of_turn>model\n"
    learned = [t for t in enc.labels if t != IGNORE_INDEX]
    assert learned == enc.ids[enc.prompt_len:]
    assert tok.decode(learned) == "Hi!<end_of_turn>"  # the model learns to end its turn...
    assert set(encoder.stop_ids) == {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}  # ...and stops
    assert tok.convert_ids_to_tokens(enc.ids[:3]) == ["<bos>", "<start_of_turn>", "user"]  # one BOS, real markers
    assert enc.ids[:enc.prompt_len] == tok(enc.prompt, add_special_tokens=False)["input_ids"]


def test_sdpa_is_used_and_matches_eager_across_the_sliding_window():
    """transformers 5 trains Gemma 3 with SDPA (no attention soft-capping, unlike Gemma 2, for which it asked for
    eager): the loaded model uses it, and it gives eager's loss and gradients on a padded batch longer than the
    window."""
    loaded = load_model(gemma_cfg())
    model = loaded.model
    assert model.config._attn_implementation == "sdpa"
    assert model.config.layer_types[0] == "sliding_attention" and model.config.sliding_window == 8
    ids = torch.randint(3, 262144, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    results = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results[impl] = (loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    model.set_attn_implementation("sdpa")
    assert torch.allclose(results["sdpa"][0], results["eager"][0], rtol=1e-5)
    assert torch.allclose(results["sdpa"][1], results["eager"][1], rtol=1e-4, atol=1e-7)


def test_planner_knows_gemma3s_shape():
    from transformers import AutoModelForCausalLM

    from peftlab.models import resolve_model_source

    arch = load_arch(GEMMA)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_source(GEMMA))
    assert arch.total_params() == sum(p.numel() for p in model.parameters())  # 4 norms a layer, q/k norms
    assert (arch.vocab_size, arch.tie_word_embeddings, arch.head_dim) == (262144, True, 32)
    assert (arch.sliding_window, arch.sliding_layers) == (8, 1)
    real = load_arch("google/gemma-3-270m")  # the built-in row, from the published config
    assert (real.vocab_size, real.head_dim, real.sliding_window, real.sliding_layers) == (262144, 256, 512, 15)


def test_model_card_names_the_hub_base():
    from peftlab.model_card import base_model_id

    assert base_model_id("gemma3-270m") == "google/gemma-3-270m"


@pytest.mark.slow
def test_real_gemma3_270m_loads_and_is_pretrained(tmp_path, data_dir):
    """The packaged GGUF, assembled and converted once into the cache: its config matches the built-in row and its
    perplexity on WikiText is a pretrained model's (random init would be ~262k)."""
    import dataclasses

    from peftlab.evaluate import run_eval

    assert load_arch("gemma3-270m") == dataclasses.replace(load_arch("Gemma-3-270M"), name="gemma3-270m")
    result = run_eval(dict(model="gemma3-270m", eval_subset=8, precision="fp32"), None)
    assert 3 < result["metrics"]["perplexity"] < 200
