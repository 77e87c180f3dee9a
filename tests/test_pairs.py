"""Preference pairs: splitting HH transcripts, row formats, bad rows reported by number, the real HH file."""

import gzip
import json
import os
from pathlib import Path

import pytest

from posttrain.data.pairs import PairError, load_pairs, split_hh
from posttrain.errors import PosttrainError

SHARED = Path(os.environ.get("POSTTRAIN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HH_TEST = SHARED / "hh_rlhf_helpful_base" / "test.jsonl.gz"

H, A = "\n\nHuman:", "\n\nAssistant:"


def naive_split(transcript: str) -> tuple[str, str]:
    """What a naive loader does: cut each transcript at its own last Assistant marker."""
    cut = transcript.rfind(A) + len(A)
    return transcript[:cut], transcript[cut:]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ------------------------------------------------------------------ split_hh
def test_split_hh_single_turn():
    chosen = f"{H} What is 2+2?{A} It is 4."
    rejected = f"{H} What is 2+2?{A} Five."
    assert split_hh(chosen, rejected) == (f"{H} What is 2+2?{A}", " It is 4.", " Five.")


def test_split_hh_shared_leading_words_stay_in_both_completions():
    chosen = f"{H} Name a fruit.{A} Sure, here is one: apple."
    rejected = f"{H} Name a fruit.{A} Sure, here is one: a carrot."
    prompt, c, r = split_hh(chosen, rejected)
    # The longest common prefix runs into the reply (" Sure, here is one: a"); the split moves back to the turn.
    assert prompt == f"{H} Name a fruit.{A}"
    assert c == " Sure, here is one: apple." and r == " Sure, here is one: a carrot."


def test_split_hh_multi_turn():
    history = f"{H} Hi{A} Hello! How can I help?{H} Recommend a book.{A} Which genre?{H} Science fiction.{A}"
    prompt, c, r = split_hh(history + " Dune.", history + " I don't read.")
    assert prompt == history and (c, r) == (" Dune.", " I don't read.")
    assert prompt.endswith(A) and prompt.count(A) == 3


def test_split_hh_where_naive_split_disagrees():
    # The chosen reply holds a second Assistant turn (as in HH rows 567 and 1166): the naive split puts
    # "Umm. Just a second..." into chosen's prompt only, so chosen and rejected get different prompts.
    chosen = f"{H} How much do solar panels cost?{A} Umm. Just a second...{A} About $50 to $80."
    rejected = f"{H} How much do solar panels cost?{A} Visit a manufacturer's web site."
    assert naive_split(chosen)[0] != naive_split(rejected)[0]
    prompt, c, r = split_hh(chosen, rejected)
    assert prompt == f"{H} How much do solar panels cost?{A}"
    assert prompt + c == chosen and prompt + r == rejected
    assert c == f" Umm. Just a second...{A} About $50 to $80."
    # Also when the rejected reply is the one that runs on into "Assistant:" turns.
    prompt2, c2, r2 = split_hh(rejected, chosen)
    assert (prompt2, c2, r2) == (prompt, r, c)


def test_split_hh_reply_with_fabricated_human_turn_is_kept():
    # A reply that invents a following human turn is still one completion of the shared prompt.
    chosen = f"{H} Thanks!{A} You're welcome."
    rejected = f"{H} Thanks!{A} No problem.{H} Bye{A} Bye!"
    prompt, c, r = split_hh(chosen, rejected)
    assert prompt == f"{H} Thanks!{A}" and r == f" No problem.{H} Bye{A} Bye!"


def test_split_hh_unsplittable_rows_raise_with_reason():
    with pytest.raises(ValueError, match="identical") as exc:
        split_hh(f"{H} Hi{A} Hello", f"{H} Hi{A} Hello")
    assert exc.value.reason == "identical"
    with pytest.raises(PairError, match="only in whitespace"):
        split_hh(f"{H} Hi{A} Hello", f"{H} Hi{A} Hello ")
    with pytest.raises(ValueError, match="no common dialogue prefix ending at an assistant turn"):
        split_hh(f"{H} Hi{A} Hello", f"{H} Hey{A} Hello")
    # Prompts that differ slightly in an earlier human turn: no shared prompt, not a preference pair.
    with pytest.raises(ValueError, match="differ in a human turn") as exc:
        split_hh(f"{H} Hi{A} Hello{H} A joke?{A} Knock knock.", f"{H} Hi{A} Hello{H} A joke, please?{A} No.")
    assert exc.value.reason == "unsplittable"
    # Empty final replies (HH has rejected replies that are a single space).
    for chosen, rejected in [(f"{H} Hi{A} Hello", f"{H} Hi{A} "), (f"{H} Hi{A}", f"{H} Hi{A} Hello")]:
        with pytest.raises(ValueError, match="empty") as exc:
            split_hh(chosen, rejected)
        assert exc.value.reason == "empty_completion"
    with pytest.raises(ValueError, match="no human turn"):
        split_hh(f"{A} a", f"{A} b")


# ------------------------------------------------------------ row formats
def test_prompt_chosen_rejected_rows_with_malformed_rows_reported(tmp_path):
    f = _write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "p1", "chosen": "good", "rejected": "bad"},  # line 1: kept
        {"prompt": "p2", "chosen": "good"},  # line 2: missing rejected
        {"prompt": "p3", "chosen": "  ", "rejected": "bad"},  # line 3: empty completion
        {"prompt": "p4", "chosen": "same", "rejected": "same"},  # line 4: identical
        {"prompt": "p5", "chosen": "x" * 50, "rejected": "short"},  # line 5: over max_chars
        "{not json",  # line 6: not JSON (skipped by the shared loader, with a warning)
        {"id": "mine", "prompt": "p7", "chosen": "yes", "rejected": "no"},  # line 7: kept
        {"prompt": "p8", "chosen": 3, "rejected": "no"},  # line 8: malformed
    ])
    ds, report = load_pairs("prefs", str(f), "prompt_chosen_rejected", "train", max_chars=40)
    assert ds.column_names == ["id", "prompt", "chosen", "rejected", "messages", "score_chosen", "score_rejected", "row"]
    assert ds["row"] == [1, 7]
    assert ds["prompt"] == ["p1", "p7"] and ds["id"] == ["prefs-train-000000", "mine"]
    assert ds["messages"] == [None, None]
    assert (report.rows_read, report.kept) == (7, 2)
    assert report.skipped == {"missing_fields": 2, "empty_completion": 1, "identical": 1, "too_long": 1}
    assert report.examples == {"missing_fields": [2, 8], "empty_completion": [3], "identical": [4], "too_long": [5]}
    summary = report.summary()
    print(summary)
    assert "read 7 rows, kept 2, skipped 5" in summary and "missing or malformed fields: 2 (rows 2, 8)" in summary

    with pytest.raises(PosttrainError, match=r"data.prefs split 'train': row 2: missing or malformed fields: .*'rejected'"):
        load_pairs("prefs", str(f), "prompt_chosen_rejected", "train", skip_bad_rows=False)
    # max_rows stops once that many rows are kept.
    ds, report = load_pairs("prefs", str(f), "prompt_chosen_rejected", "train", max_rows=1)
    assert len(ds) == 1 and report.rows_read == 1


def test_conversational_rows_from_gzip(tmp_path):
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    rows = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Lyon."}]},  # line 1
        {"prompt": user, "chosen": "Paris.", "rejected": "Nice."},  # line 2: plain-string completions
        {"prompt": "not a list", "chosen": "a", "rejected": "b"},  # line 3: malformed prompt
        {"prompt": user, "chosen": [{"role": "user", "content": "Paris."}], "rejected": "b"},  # line 4: not assistant
        {"prompt": user, "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"},  # line 5: empty
        {"prompt": user, "chosen": "Paris.", "rejected": [{"role": "assistant", "content": "Paris."}]},  # 6: same
        {"prompt": user, "rejected": "b"},  # line 7: missing chosen
        {"prompt": user, "chosen": "Paris, " * 10, "rejected": "Rome."},  # line 8: over max_chars
    ]
    f = tmp_path / "test.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    ds, report = load_pairs("chat", str(tmp_path), "conversational", "test", max_chars=60)  # a directory: test.*
    assert ds["chosen"] == ["Paris.", "Paris."] and ds["rejected"] == ["Lyon.", "Nice."]
    assert ds["prompt"] == ["", ""] and json.loads(ds["messages"][0]) == user
    assert (report.rows_read, report.kept) == (8, 2)
    assert report.skipped == {"missing_fields": 3, "empty_completion": 1, "identical": 1, "too_long": 1}
    assert report.examples["missing_fields"] == [3, 4, 7] and report.examples["identical"] == [6]
    assert report.examples["too_long"] == [8]
    with pytest.raises(PosttrainError, match=r"row 3: missing or malformed fields"):
        load_pairs("chat", str(tmp_path), "conversational", "test", skip_bad_rows=False)


def test_examples_capped_at_five_and_no_usable_rows(tmp_path):
    f = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "chosen": "s", "rejected": "s"}] * 7)
    with pytest.raises(PosttrainError, match=r"no usable rows .*row 1: 'chosen' and 'rejected' are the same text"):
        load_pairs("dup", str(f), "prompt_chosen_rejected", "train")
    f = _write_jsonl(tmp_path / "more.jsonl", [{"prompt": "p", "chosen": "s", "rejected": "s"}] * 7
                     + [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    _, report = load_pairs("dup", str(f), "prompt_chosen_rejected", "train")
    assert report.skipped == {"identical": 7} and report.examples["identical"] == [1, 2, 3, 4, 5]
    assert "(rows 1, 2, 3, 4, 5 ...)" in report.summary()


def test_hh_rows_and_bad_arguments(tmp_path):
    f = _write_jsonl(tmp_path / "train.jsonl", [
        {"chosen": f"{H} Hi{A} Hello there.", "rejected": f"{H} Hi{A} Go away."},
        {"chosen": f"{H} Hi{A} Hello", "rejected": f"{H} Hey{A} Hello"},  # line 2: unsplittable
        {"chosen": f"{H} Hi{A} Hello"},  # line 3: missing rejected
    ])
    ds, report = load_pairs("hh", str(f), "hh", "train")
    assert ds[0] == {"id": "hh-train-000000", "prompt": f"{H} Hi{A}", "chosen": " Hello there.",
                     "rejected": " Go away.", "messages": None, "score_chosen": None, "score_rejected": None, "row": 1}
    assert report.skipped == {"unsplittable": 1, "missing_fields": 1}
    assert report.examples == {"unsplittable": [2], "missing_fields": [3]}
    with pytest.raises(PosttrainError, match=r"row 2: unsplittable HH transcripts: no common dialogue prefix"):
        load_pairs("hh", str(f), "hh", "train", skip_bad_rows=False)
    with pytest.raises(PosttrainError, match="unknown preference-pair format 'dpo'"):
        load_pairs("hh", str(f), "dpo", "train")
    with pytest.raises(PosttrainError, match="no such file"):
        load_pairs("hh", str(tmp_path / "nope.jsonl"), "hh", "train")


# ------------------------------------------------------------ real HH file
def test_real_hh_helpful_base_test_split():
    if not HH_TEST.exists():
        pytest.skip(f"real data not found: {HH_TEST} (set POSTTRAIN_TEST_DATA to the shared data folder)")
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as fh:
        originals = [json.loads(line) for line in fh]
    ds, report = load_pairs("hh_helpful", str(HH_TEST), "hh", "test")
    print()
    print(report.summary())
    assert report.rows_read == len(originals)  # every line of the file is a row
    assert report.kept == len(ds) and report.kept + report.skipped_total == report.rows_read
    # SOURCE.md: 0-based rows 721 and 2168 have chosen == rejected, i.e. lines 722 and 2169.
    assert {722, 2169} <= set(report.examples.get("identical", []))
    assert report.kept > 0.99 * report.rows_read

    kept_lines = set()
    for row in ds:
        index = int(row["id"].rsplit("-", 1)[1])  # the default id holds the row's index in the file
        original = originals[index]
        kept_lines.add(index + 1)
        assert row["prompt"].endswith(A) and row["prompt"].startswith(H)
        assert row["chosen"].strip() and row["rejected"].strip()
        assert row["prompt"] + row["chosen"] == original["chosen"]
        assert row["prompt"] + row["rejected"] == original["rejected"]

    # Rows where splitting each transcript at its own last Assistant marker gives two different prompts.
    naive_wrong = [i for i, r in enumerate(originals)
                   if naive_split(r["chosen"])[0] != naive_split(r["rejected"])[0]]
    print(f"naive split gives different prompts in {len(naive_wrong)} rows (lines {[i + 1 for i in naive_wrong]})")
    assert naive_wrong, "expected some rows (e.g. 0-based 567 and 1166) where the naive split disagrees"
    assert {567, 1166} <= set(naive_wrong)
    for i in naive_wrong:
        prompt, c, r = split_hh(originals[i]["chosen"], originals[i]["rejected"])  # handled, not raised
        assert prompt + c == originals[i]["chosen"] and prompt + r == originals[i]["rejected"]
        assert i + 1 in kept_lines


def test_scores_are_kept_and_can_be_required(tmp_path):
    f = _write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "p1", "chosen": "a", "rejected": "b", "score_chosen": 8, "score_rejected": 3.5},
        {"prompt": "p2", "chosen": "a", "rejected": "b"},  # line 2: no scores
        {"prompt": "p3", "chosen": "a", "rejected": "b", "score_chosen": "high", "score_rejected": 1},  # line 3
    ])
    ds, report = load_pairs("prefs", str(f), "prompt_chosen_rejected", "train")
    assert ds["score_chosen"] == [8.0, None] and ds["score_rejected"] == [3.5, None]
    assert report.examples == {"missing_fields": [3]}
    ds, report = load_pairs("prefs", str(f), "prompt_chosen_rejected", "train", require_scores=True)
    assert ds["prompt"] == ["p1"] and report.examples == {"missing_fields": [2, 3]}
    assert report.first_error["missing_fields"].startswith("row 2: no 'score_chosen' / 'score_rejected'")
