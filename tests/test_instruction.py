"""Instruction task: prompt masking, truncation, padding vs packing, bad input, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftlab.cli import main
from peftlab.configure import load_config
from peftlab.losses import IGNORE_INDEX
from peftlab.prompts import (
    ALPACA_PROMPT_NO_INPUT,
    Example,
    PromptEncoder,
    alpaca_example,
    choose_template,
    left_pad,
    pack_rows,
    packed_batch,
    pad_batch,
)


@pytest.fixture(scope="module")
def tokenizer():
    from peftlab.models import load_tokenizer, resolve_model_source

    cfg = load_config(None, {"model": "tiny-llama"})
    return load_tokenizer(resolve_model_source("tiny-llama"), cfg)


@pytest.fixture(scope="module")
def tiny_model():
    from peftlab.models import load_model

    model = load_model(load_config(None, {"model": "tiny-llama"})).model
    model.eval()
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- prompts and masking ---------------------------------------------------------------------------------------

def test_alpaca_masking_only_response_and_eos_carry_loss(tokenizer) -> None:
    enc = PromptEncoder(tokenizer, "alpaca", max_length=512).encode(alpaca_example("Name a colour.", "", "Blue."))
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert enc.prompt == prompt
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer("Blue.", add_special_tokens=False)["input_ids"]
    assert enc.ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    labels = enc.labels
    assert labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == response_ids + [tokenizer.eos_token_id]
    assert not enc.truncated


def test_alpaca_template_with_input() -> None:
    from peftlab.prompts import render_alpaca

    text = render_alpaca(alpaca_example("Translate.", "bonjour", "hello"))
    assert "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n" in text


def test_chat_record_in_the_alpaca_template() -> None:
    from peftlab.prompts import render_alpaca

    example = Example(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}), "6")
    assert render_alpaca(example) == ("Be brief.\n\n### Instruction:\n2+2?\n\n### Response:\n4\n\n"
                                      "### Instruction:\n3+3?\n\n### Response:\n")


def test_chat_masking_ends_with_the_end_of_turn_eos(tokenizer) -> None:
    encoder = PromptEncoder(tokenizer, choose_template("auto", tokenizer), max_length=512)
    assert encoder.template == "chat"  # SmolLM2's tokenizer has a chat template
    example = Example(({"role": "user", "content": "Say hi"},), "Hi!")
    enc = encoder.encode(example)
    assert enc.prompt == tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=False,
                                                       add_generation_prompt=True)
    learned = [t for t in enc.labels if t != IGNORE_INDEX]
    assert learned == enc.ids[enc.prompt_len:]
    assert learned[-1] == tokenizer.eos_token_id  # <|im_end|>: the model learns to stop
    assert tokenizer.decode(learned) == "Hi!<|im_end|>"
    # The masked part is exactly the prompt as generation sees it.
    assert enc.ids[:enc.prompt_len] == tokenizer(enc.prompt, add_special_tokens=False)["input_ids"]


def test_chat_template_missing_is_an_error(tokenizer) -> None:
    from peftlab.errors import UserError

    class NoTemplate:
        chat_template = None

    assert choose_template("auto", NoTemplate()) == "alpaca"
    with pytest.raises(UserError, match="no chat template"):
        choose_template("chat", NoTemplate())


def test_truncation_cuts_the_response_and_drops_overlong_prompts(tokenizer) -> None:
    example = alpaca_example("Count.", "", "one two three four five six seven eight nine ten")
    full = PromptEncoder(tokenizer, "alpaca", 512).encode(example)
    limit = full.prompt_len + 3
    cut = PromptEncoder(tokenizer, "alpaca", limit).encode(example)
    assert cut.truncated and len(cut.ids) == limit
    assert cut.ids == full.ids[:limit]  # the prompt is whole; the response lost its tail (and the EOS)
    assert PromptEncoder(tokenizer, "alpaca", full.prompt_len).encode(example) is None


def test_padding_never_carries_loss_or_attention(tokenizer) -> None:
    encoder = PromptEncoder(tokenizer, "alpaca", 512)
    a = encoder.encode(alpaca_example("Hi.", "", "Hello there, friend."))
    b = encoder.encode(alpaca_example("A much longer instruction with many more words in it.", "", "Ok."))
    batch = pad_batch([a, b], pad_id=tokenizer.pad_token_id)
    for row, e in enumerate([a, b]):
        n = len(e.ids)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    from peftlab.tasks.instruction import InstructionTask

    task = InstructionTask(load_config(None, {"task": "instruction"}))
    assert task.tokens_in(batch) == len(a.ids) + len(b.ids)
    assert task.loss_count(batch) == (len(a.ids) - a.prompt_len) + (len(b.ids) - b.prompt_len)


def test_left_pad_for_generation() -> None:
    enc = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert enc["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pack_rows_keeps_whole_examples_in_order() -> None:
    assert pack_rows([3, 4, 2, 5, 1], max_length=7) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("chunked", [False, True])
def test_packed_loss_equals_separate_losses(tokenizer, tiny_model, chunked: bool) -> None:
    """Packed examples do not attend to each other: the packed loss is the sum of the separate losses."""
    from peftlab.tasks.instruction import response_loss_sum

    encoder = PromptEncoder(tokenizer, "alpaca", 512)
    items = [encoder.encode(alpaca_example(f"Instruction {i}.", "", "Answer " * (i + 1))) for i in range(3)]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        separate = sum(float(response_loss_sum(tiny_model, pad_batch([e], pad), chunked)) for e in items)
        joined = float(response_loss_sum(tiny_model, packed_batch([items], pad_id=pad), chunked))
        padded = float(response_loss_sum(tiny_model, pad_batch(items, pad), chunked))
    # The response-only loss by hand: -log p(label) at each labelled position, from the plain logits.
    with torch.no_grad():
        manual = 0.0
        for e in items:
            logp = tiny_model(input_ids=torch.tensor([e.ids])).logits[0].float().log_softmax(-1)
            manual -= sum(float(logp[t - 1, e.ids[t]]) for t in range(e.prompt_len, len(e.ids)))
    assert separate == pytest.approx(manual, rel=1e-4)
    assert joined == pytest.approx(separate, rel=1e-4)
    assert padded == pytest.approx(separate, rel=1e-4)
    # Tail padding of a shorter packed row is neither a real token nor a labelled one.
    two_rows = packed_batch([items[:2], items[2:]], pad_id=tokenizer.pad_token_id)
    assert int(two_rows["token_mask"].sum()) == sum(len(e.ids) for e in items)
    from peftlab.losses import shifted_label_count

    assert shifted_label_count(two_rows["labels"]) == sum(len(e.ids) - e.prompt_len for e in items)


def test_batched_generation_matches_one_at_a_time(tmp_path: Path, tokenizer, tiny_model) -> None:
    from peftlab.tasks.instruction import InstructionTask

    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "x", "output": "y"}] * 2)
    cfg = load_config(None, dict(task="instruction", model="tiny-llama", dataset=str(train),
                                 eval_dataset=str(train), max_new_tokens=6, batch_size=4, max_length=64))
    task = InstructionTask(cfg)
    data = task.prepare(task.load(), tokenizer, tiny_model)
    encoder = data.encoder
    items = [encoder.encode(alpaca_example(text, "", "z")) for text in
             ("Short.", "A rather longer instruction than the first one is.", "Mid length one.")]
    together = task.generate(data, tiny_model, items)
    alone = [task.generate(data, tiny_model, [e])[0] for e in items]
    assert together == alone


def test_generation_batch_size_is_apart_from_the_training_batch(tmp_path: Path, tokenizer, tiny_model,
                                                               monkeypatch) -> None:
    """generation_batch_size sets how many prompts one greedy generate() call takes, whatever batch_size is; the
    generations are those of one prompt at a time."""
    from peftlab.tasks.instruction import InstructionTask

    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "x", "output": "y"}] * 2)
    tasks = {size: InstructionTask(load_config(None, dict(
        task="instruction", model="tiny-llama", dataset=str(train), eval_dataset=str(train), max_new_tokens=6,
        batch_size=1, max_length=64, generation_batch_size=size))) for size in (None, 3)}
    data = tasks[3].prepare(tasks[3].load(), tokenizer, tiny_model)
    items = [data.encoder.encode(alpaca_example(text, "", "z")) for text in
             ("Short.", "A rather longer instruction than the first one is.", "Mid length one.")]
    rows = []
    real = tiny_model.generate
    monkeypatch.setattr(tiny_model, "generate", lambda **kw: rows.append(len(kw["input_ids"])) or real(**kw))
    batched = tasks[3].generate(data, tiny_model, items)
    assert rows == [3]
    rows.clear()
    assert tasks[None].generate(data, tiny_model, items) == batched
    assert rows == [1, 1, 1]  # default: the evaluation batch size (here batch_size 1)


def test_generation_shows_a_progress_bar_on_terminals_only(tmp_path: Path, tokenizer, tiny_model,
                                                           monkeypatch) -> None:
    import peftlab.tasks.instruction as instruction
    from peftlab.tasks.common import progress

    bars = []

    class Recording:
        def __init__(self, total, desc, unit):
            self.args, self.done, self.real = (total, desc, unit), 0, progress(total, desc, unit)
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

        def update(self, n):
            self.done += n

    monkeypatch.setattr(instruction, "progress", Recording)
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"x{i}", "output": "y"} for i in range(3)])
    cfg = load_config(None, dict(task="instruction", model="tiny-llama", dataset=str(train),
                                 eval_dataset=str(train), max_new_tokens=2, batch_size=2, max_length=64))
    task = instruction.InstructionTask(cfg)
    data = task.prepare(task.load(), tokenizer, tiny_model)
    task.evaluate(data, tiny_model, "before")
    assert [(b.args, b.done) for b in bars] == [((3, "generate (before)", "example"), 3)]
    assert bars[0].real.disable  # pytest's captured stderr is not a terminal


# --- bad input -------------------------------------------------------------------------------------------------

def ins_argv(tmp_path: Path, train: Path, evaluation: Path | None = None) -> list[str]:
    return ["train", "--task", "instruction", "--model", "tiny-llama", "--dataset", str(train), "--eval-dataset",
            str(evaluation or train), "--output-dir", str(tmp_path / "run")]


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("peftlab: error: ")
    return err


def test_row_missing_its_output(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    err = error_line(capsys, ins_argv(tmp_path, train))
    assert "train.jsonl" in err and "row 2" in err and "missing its 'output'" in err


def test_null_output_is_missing_but_blank_output_is_skipped(tmp_path: Path, capsys) -> None:
    from peftlab.tasks.instruction import InstructionTask

    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": None}])
    assert "row 1" in error_line(capsys, ins_argv(tmp_path, train))
    train = write_jsonl(tmp_path / "train2.jsonl", [{"instruction": "a", "input": "", "output": ""},
                                                   {"instruction": "b", "input": "", "output": "c"}])
    task = InstructionTask(load_config(None, dict(task="instruction", dataset=str(train),
                                                  eval_dataset=str(train))))
    raw = task.load()
    assert [e.response for e in raw.train_examples] == ["c"]
    assert any("skipped 1 records" in n and "blank" in n for n in raw.notes)


def test_no_instruction_or_messages_column(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    err = error_line(capsys, ins_argv(tmp_path, train))
    assert "'instruction'" in err and "'messages'" in err and "prompt, completion" in err


def test_no_output_column(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "response": "b"}])
    err = error_line(capsys, ins_argv(tmp_path, train))
    assert "no column 'output'" in err and "instruction, response" in err


def test_empty_instruction(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"},
                                                  {"instruction": "  ", "output": "b"}])
    err = error_line(capsys, ins_argv(tmp_path, train))
    assert "row 2" in err and "empty 'instruction'" in err


def test_chat_record_without_assistant_response(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    err = error_line(capsys, ins_argv(tmp_path, train))
    assert "row 1" in err and "last message must be from the assistant" in err


def test_chat_record_with_bad_role(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}])
    err = error_line(capsys, ins_argv(tmp_path, train))
    assert "message 1" in err and "role" in err


def test_invalid_json_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": oops}\n', encoding="utf-8")
    err = error_line(capsys, ins_argv(tmp_path, bad))
    assert "train.jsonl" in err and "line 3 is not valid JSON" in err


def test_not_utf8(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b'{"instruction": "caf\xe9", "output": "b"}\n')
    err = error_line(capsys, ins_argv(tmp_path, bad))
    assert "train.jsonl" in err and "not valid UTF-8" in err and "line 1" in err


def test_empty_file(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    err = error_line(capsys, ins_argv(tmp_path, empty))
    assert "train.jsonl" in err and "empty" in err


# --- end to end ------------------------------------------------------------------------------------------------

def qa_rows(n: int) -> list[dict]:
    colours = ["red", "blue", "green", "black"]
    return [{"instruction": f"What colour is item {i}?", "input": "", "output": f"Item {i} is {colours[i % 4]}."}
            for i in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_train_and_reload_reproduces_metrics(tmp_path: Path, capsys, packing: bool) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(16))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", qa_rows(4))
    run = tmp_path / "run"
    argv = [*ins_argv(tmp_path, train, evaluation), "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2",
            "--epochs", "4", "--max-length", "96", "--set", "max_new_tokens=6", "--set", "generation_subset=3",
            "--set", f"packing={str(packing).lower()}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ROUGE-L" in out and "Perplexity" in out and "BLEU" in out
    results = json.loads((run / "results.json").read_text())
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    assert set(after) >= {"rougeL", "bleu", "exact_match", "perplexity"}
    assert after["perplexity"] < before["perplexity"]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    assert results["data"]["packing"] is packing
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and {"prompt", "reference", "generation", "base_generation"} <= set(preds[0])
    assert preds[0]["reference"] == "Item 0 is red."
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out) == after
