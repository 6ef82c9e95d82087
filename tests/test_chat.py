"""Multi-turn chat: every assistant turn learned (chat_loss=all) or the last (chat_loss=last), under the SmolLM2 and
Gemma 3 chat templates, padded and packed; ShareGPT records read as the same conversations as `messages`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftlab.cli import main
from peftlab.configure import load_config
from peftlab.data.sources import DataSplit
from peftlab.errors import UserError
from peftlab.losses import IGNORE_INDEX
from peftlab.prompts import Example, PromptEncoder, packed_batch, pad_batch
from peftlab.tasks.instruction import parse_split

FIXTURES = Path(__file__).parent / "fixtures"
SYSTEM = {"role": "system", "content": "Answer briefly."}
TURNS = ({"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy?"},
         {"role": "assistant", "content": "Rome, since 1871."})
#: One 3-turn record: the system turn, then two user/assistant exchanges.
THREE_TURNS = Example((SYSTEM, *TURNS[:3]), TURNS[3]["content"])


@pytest.fixture(scope="module")
def smollm2():
    from peftlab.models import load_tokenizer, resolve_model_source

    return load_tokenizer(resolve_model_source("tiny-llama"), load_config(None, {"model": "tiny-llama"}))


@pytest.fixture(scope="module")
def gemma3():
    """Gemma 3's chat template (google/gemma-3-*-it) and its turn tokens, on the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    from peftlab.models import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = (FIXTURES / "gemma3_chat_template.jinja").read_text(encoding="utf-8")
    return tok


TEMPLATES = {"smollm2": "<|im_end|>", "gemma3": "<end_of_turn>"}


def learned_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled tokens, each as its token ids (labels equal the ids where learned)."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


def decoded_runs(tokenizer, ids, labels) -> list[str]:
    return [tokenizer.decode(run) for run in learned_runs(list(ids), list(labels))]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("packed", [False, True])
def test_three_turn_record_learns_exactly_its_two_assistant_turns(request, name: str, packed: bool) -> None:
    tokenizer = request.getfixturevalue(name)
    eot = TEMPLATES[name]
    encoder = PromptEncoder(tokenizer, "chat", max_length=512)
    enc = encoder.encode(THREE_TURNS)
    expected = [f"Paris.{eot}", f"Rome, since 1871.{eot}"]
    if packed:  # two copies in one packed row: each keeps exactly its own two turns
        batch = packed_batch([[enc, enc]], pad_id=tokenizer.pad_token_id)
        assert batch["position_ids"][0].tolist() == list(range(len(enc.ids))) * 2  # restart: no attention across
        expected = expected * 2
    else:
        batch = pad_batch([enc], pad_id=tokenizer.pad_token_id)
    assert decoded_runs(tokenizer, batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) == expected
    # The generation prompt is the conversation up to the last user turn, tokenized as generation is given it.
    prompt = tokenizer.apply_chat_template([SYSTEM, *TURNS[:3]], tokenize=False, add_generation_prompt=True)
    assert enc.prompt == prompt and prompt.rstrip().endswith(("assistant", "model"))
    assert enc.ids[:enc.prompt_len] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # The whole conversation as the template writes it (without the trailing newline after the last turn).
    full = tokenizer.apply_chat_template([SYSTEM, *TURNS], tokenize=False)
    assert enc.ids == tokenizer(full.rstrip(), add_special_tokens=False)["input_ids"]
    assert encoder.stop_ids == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(eot)})


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_loss_last_learns_only_the_last_turn(request, name: str) -> None:
    tokenizer = request.getfixturevalue(name)
    encoder = PromptEncoder(tokenizer, "chat", max_length=512)
    every, last = encoder.encode(THREE_TURNS, "all"), encoder.encode(THREE_TURNS, "last")
    assert last.ids == every.ids
    assert decoded_runs(tokenizer, last.ids, last.labels) == [f"Rome, since 1871.{TEMPLATES[name]}"]
    assert last.learned_spans == (every.learned_spans[-1],) == ((last.prompt_len, len(last.ids)),)


def test_gemma3_trims_the_content_and_the_span_follows(gemma3) -> None:
    example = Example(({"role": "user", "content": "Hi"},), "  Hello there.\n")
    enc = PromptEncoder(gemma3, "chat", 512).encode(example)
    assert decoded_runs(gemma3, enc.ids, enc.labels) == ["Hello there.<end_of_turn>"]


def test_alpaca_template_learns_every_turn_and_ends_with_eos(smollm2) -> None:
    enc = PromptEncoder(smollm2, "alpaca", 512).encode(THREE_TURNS)
    assert decoded_runs(smollm2, enc.ids, enc.labels) == ["Paris.", "Rome, since 1871.<|im_end|>"]
    assert enc.prompt.endswith("### Instruction:\nAnd of Italy?\n\n### Response:\n")


def test_truncation_keeps_the_turns_that_fit(smollm2) -> None:
    encoder = PromptEncoder(smollm2, "chat", 512)
    full = encoder.encode(THREE_TURNS)
    first_stop = full.learned_spans[0][1]
    cut = PromptEncoder(smollm2, "chat", first_stop + 2).encode(THREE_TURNS)
    assert cut.truncated and cut.learned_spans == (full.learned_spans[0],) and not cut.prompt_fits
    # Under chat_loss=last nothing learnable fits: the record is dropped, as before.
    assert PromptEncoder(smollm2, "chat", first_stop + 2).encode(THREE_TURNS, "last") is None


def test_a_template_that_rewrites_the_answer_is_refused(smollm2) -> None:
    from transformers import AutoTokenizer

    from peftlab.models import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(UserError, match=r"message 3 \(assistant\) as 'PARIS.<\|im_end\|>'"):
        PromptEncoder(tok, "chat", 512).encode(THREE_TURNS)


def test_packed_multi_turn_loss_equals_the_separate_losses(smollm2) -> None:
    """No cross-contamination: packed conversations give the summed loss of each alone, over all their turns."""
    from peftlab.models import load_model
    from peftlab.tasks.instruction import response_loss_sum

    model = load_model(load_config(None, {"model": "tiny-llama"})).model.eval()
    encoder = PromptEncoder(smollm2, "chat", 512)
    other = Example((TURNS[0],), "Paris is the capital of France.")
    items = [encoder.encode(THREE_TURNS), encoder.encode(other), encoder.encode(THREE_TURNS)]
    pad = smollm2.pad_token_id
    with torch.no_grad():
        separate = sum(float(response_loss_sum(model, pad_batch([e], pad))) for e in items)
        joined = float(response_loss_sum(model, packed_batch([items], pad)))
        manual = 0.0
        for e in items:
            logp = model(input_ids=torch.tensor([e.ids])).logits[0].float().log_softmax(-1)
            manual -= sum(float(logp[t - 1, e.ids[t]]) for a, b in e.learned_spans for t in range(a, b))
    assert separate == pytest.approx(manual, rel=1e-4)
    assert joined == pytest.approx(separate, rel=1e-4)


# --- ShareGPT ----------------------------------------------------------------------------------------------------

SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def as_sharegpt(messages) -> dict:
    return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]}


def chat_rows(n: int) -> list[list[dict]]:
    colours = ["red", "blue", "green", "black"]
    return [[SYSTEM, {"role": "user", "content": f"What colour is item {i}?"},
             {"role": "assistant", "content": f"Item {i} is {colours[i % 4]}."},
             {"role": "user", "content": "And the next one?"},
             {"role": "assistant", "content": f"Item {i + 1} is {colours[(i + 1) % 4]}."}] for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def split_of(records: list[dict]) -> DataSplit:
    return DataSplit(records, "file:data.jsonl", "train", "0")


def test_sharegpt_gives_the_same_tokens_and_masks_as_messages(smollm2) -> None:
    rows = chat_rows(3)
    from_messages, _ = parse_split(split_of([{"messages": m} for m in rows]))
    from_sharegpt, _ = parse_split(split_of([as_sharegpt(m) for m in rows]))
    assert from_sharegpt == from_messages
    encoder = PromptEncoder(smollm2, "chat", 512)
    for a, b in zip(from_messages, from_sharegpt, strict=True):
        ea, eb = encoder.encode(a), encoder.encode(b)
        assert (ea.ids, ea.labels) == (eb.ids, eb.labels)
        assert len(learned_runs(eb.ids, eb.labels)) == 2


def test_sharegpt_tool_turns_are_masked(smollm2) -> None:
    record = {"conversations": [{"from": "human", "value": "Weather in Paris?"}, {"from": "gpt", "value": "Checking."},
                                {"from": "tool", "value": "18C, sunny"}, {"from": "gpt", "value": "18C and sunny."}]}
    (example,), _ = parse_split(split_of([record]), "sharegpt")
    assert example.messages[2] == {"role": "tool", "content": "18C, sunny"}
    enc = PromptEncoder(smollm2, "chat", 512).encode(example)
    assert decoded_runs(smollm2, enc.ids, enc.labels) == ["Checking.<|im_end|>", "18C and sunny.<|im_end|>"]


@pytest.mark.parametrize(("turn", "message"), [({"from": "bot", "value": "x"}, "row 2: turn 2 has role 'bot'"),
                                               ({"from": "gpt"}, "row 2: turn 2 (gpt) has no string 'value'")])
def test_sharegpt_bad_turn_is_one_line_naming_row_and_turn(tmp_path: Path, capsys, turn, message) -> None:
    good = as_sharegpt(chat_rows(1)[0][1:3])
    bad = {"conversations": [{"from": "human", "value": "hi"}, turn]}
    train = write_jsonl(tmp_path / "train.jsonl", [good, bad])
    assert main(["train", "--task", "instruction", "--model", "tiny-llama", "--dataset", str(train),
                 "--eval-dataset", str(train), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("peftlab: error: ") and message in err, err


def test_chat_format_names_the_layout(tmp_path: Path) -> None:
    both = [{"messages": chat_rows(1)[0], **as_sharegpt(chat_rows(2)[1])}]
    assert parse_split(split_of(both))[0][0].response == "Item 1 is blue."  # auto: messages first
    assert parse_split(split_of(both), "sharegpt")[0][0].response == "Item 2 is green."
    with pytest.raises(UserError, match="no column 'conversations'.*chat_format=sharegpt"):
        parse_split(split_of([{"messages": chat_rows(1)[0]}]), "sharegpt")


@pytest.mark.parametrize("packing", [False, True])
def test_sharegpt_file_trains_and_evaluates(tmp_path: Path, capsys, packing: bool) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [as_sharegpt(m) for m in chat_rows(12)])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [as_sharegpt(m) for m in chat_rows(3)])
    run = tmp_path / "run"
    assert main(["train", "--task", "instruction", "--model", "tiny-llama", "--dataset", str(train),
                 "--eval-dataset", str(evaluation), "--output-dir", str(run), "--batch-size", "4", "--grad-accum",
                 "1", "--lr", "1e-2", "--epochs", "3", "--max-length", "128", "--set", "max_new_tokens=6",
                 "--set", f"packing={str(packing).lower()}", "--set", "precision=fp32"]) == 0
    results = json.loads((run / "results.json").read_text())
    after, before = results["metrics"]["after"], results["metrics"]["before"]
    assert after["perplexity"] < before["perplexity"]
    assert results["data"]["learned_turns"] == {"train": 24, "eval": 6} and results["data"]["chat_loss"] == "all"
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert preds[0]["reference"] == "Item 1 is blue." and preds[0]["prompt"].endswith(
        "And the next one?<|im_end|>\n<|im_start|>assistant\n")
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out) == after


def test_chat_fields_are_validated() -> None:
    assert load_config(None, {}).chat_loss == "all" and load_config(None, {}).chat_format == "auto"
    with pytest.raises(UserError, match="chat_loss"):
        load_config(None, {"task": "instruction", "chat_loss": "first"})
    with pytest.raises(UserError, match="chat_format"):
        load_config(None, {"task": "instruction", "chat_format": "alpaca"})
