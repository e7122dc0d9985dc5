"""The contamination audit counts validation examples that repeat the training (or replay) data."""
from __future__ import annotations

import json

from loraplex.training import validate_jsonl
from loraplex.training.contamination import audit, describe
from tests.topic_data import topic_rows


def dataset(rows: list[dict]):
    return validate_jsonl("".join(json.dumps(row) + "\n" for row in rows).encode())


def fresh_rows(num: int, first: int) -> list[dict]:
    """Rows sharing words but no run of 8: the numbers differ in every window."""
    return [{"prompt": f"Item {i} reads {i * 7} and {i * 13} in the ledger of {i * 17} today.", "completion": f" label {i}"}
            for i in range(first, first + num)]


def test_a_validation_file_repeating_20_percent_of_the_training_rows_reads_20_percent_duplicates():
    train = fresh_rows(50, 0)
    validation = train[:10] + fresh_rows(40, 1000)  # 10 of 50 validation rows (20%) are training rows
    record = audit(dataset(train), dataset(validation), None)
    part = record["validation_vs_training"]
    assert (part["num_valid_examples"], part["num_exact_duplicates"], part["exact_duplicate_share"]) == (50, 10, 0.2)
    assert part["num_ngram_overlaps"] >= 10 and record["validation_vs_replay"] is None and record["warned"]
    assert "10 of 50 validation examples (20.0%) are exact duplicates of the training file" in describe(record)
    assert "not trustworthy" in describe(record)


def test_clean_files_do_not_warn_and_near_copies_show_as_ngram_overlap():
    train, validation = fresh_rows(30, 0), fresh_rows(30, 500)
    clean = audit(dataset(train), dataset(validation), dataset(fresh_rows(10, 900)))
    assert not clean["warned"] and clean["validation_vs_training"]["num_exact_duplicates"] == 0
    assert clean["validation_vs_training"]["num_ngram_overlaps"] == 0  # shared words, but no 8 in a row
    assert clean["validation_vs_replay"]["num_exact_duplicates"] == 0
    near = [{**row, "completion": " another label"} for row in train[:4]]  # same prompt, new answer
    record = audit(dataset(train), dataset(near + validation[:26]), None)
    assert record["validation_vs_training"]["num_exact_duplicates"] == 0
    assert record["validation_vs_training"]["num_ngram_overlaps"] == 4 and record["warned"]  # 4/30 > 10%
    assert audit(dataset(train), None, None) is None
    assert audit(dataset(topic_rows(30, 0)), dataset(topic_rows(30, 0)), None)["validation_vs_training"]["exact_duplicate_share"] == 1.0
