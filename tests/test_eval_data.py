"""Evaluation data loaders on the shared files, layout detection, and errors naming record and field."""

import json

import pytest

from conftest import COUNTERFACT, SHARED
from factedit.core.known_facts import load_known_facts
from factedit.evaluation import CounterFactCase, DatasetError, ZsRECase, load_cases, resolve_dataset
from factedit.evaluation.datasets import sha256_of
from factedit.evaluation.downstream import TASKS, load_task, task_prompts

DATA = SHARED / "data"
ORIGINAL = DATA / "counterfact" / "counterfact_original_sample.json"
ZSRE = DATA / "zsre" / "zsre_mend_1k.jsonl"

pytestmark = pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")


def test_counterfact_both_layouts_give_the_same_case():
    orig = load_cases(ORIGINAL)[0]
    ke = load_cases(COUNTERFACT, limit=3)[0]
    assert isinstance(orig, CounterFactCase) and isinstance(ke, CounterFactCase)
    assert orig.request == ke.request
    assert orig.request.prompt == "The mother tongue of {} is" and orig.request.target_true == "French"
    assert (len(orig.paraphrase_prompts), len(orig.neighborhood_prompts), len(orig.generation_prompts)) == (2, 10, 10)
    assert ke.neighborhood_prompts == ("Michel Rocard is a native speaker of",)
    assert ke.generation_prompts == (ke.request.text, ke.paraphrase_prompts[0])


def test_offset_limit_and_case_ids():
    cases = load_cases(COUNTERFACT, limit=2, offset=5)
    lines = COUNTERFACT.read_text(encoding="utf-8").splitlines()[5:7]
    assert [c.case_id for c in cases] == [json.loads(l)["case_id"] for l in lines]
    with pytest.raises(DatasetError, match="no records at offset"):
        load_cases(ORIGINAL, offset=3)


def test_zsre():
    cases = load_cases(ZSRE, limit=4)
    c = cases[0]
    assert isinstance(c, ZsRECase) and c.case_id == 0
    assert c.request.text == "What is the product made by UniFirst?"
    assert (c.request.target_new, c.request.target_true) == ("unmanned aircraft", "uniform")
    assert c.loc_ans == "Walter Sobchak" and c.rephrase.startswith("What will be")


def test_knowns():
    knowns = load_known_facts(DATA / "knowns" / "known_1000.json")
    assert len(knowns) == 1209 and knowns[0].subject == "Vinson Massif"


def _write(tmp_path, name, records, jsonl=True):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records), encoding="utf-8")
    return p


def test_malformed_records_name_record_and_field(tmp_path):
    orig = json.loads(ORIGINAL.read_text())[0]
    bad = dict(orig, case_id=7, paraphrase_prompts="not a list")
    p = _write(tmp_path, "cf.json", [orig, bad], jsonl=False)
    with pytest.raises(DatasetError, match=r"cf.json record 1 \(case_id 7\): field 'paraphrase_prompts'"):
        load_cases(p)
    no_true = json.loads(json.dumps(orig))
    del no_true["requested_rewrite"]["target_true"]
    with pytest.raises(DatasetError, match=r"record 0 \(case_id 0\).*target_true"):
        load_cases(_write(tmp_path, "cf2.json", [no_true], jsonl=False))
    ke = json.loads(COUNTERFACT.read_text(encoding="utf-8").splitlines()[0])
    missing = {k: v for k, v in ke.items() if k != "rephrase_prompt"}
    with pytest.raises(DatasetError, match=r"ke.jsonl:2 \(case_id 0\): missing field 'rephrase_prompt'"):
        load_cases(_write(tmp_path, "ke.jsonl", [dict(ke, case_id=1), missing]))
    with pytest.raises(DatasetError, match=r"ke2.jsonl:1.*subject 'Nobody' does not occur"):
        load_cases(_write(tmp_path, "ke2.jsonl", [dict(ke, subject="Nobody")]))
    z = json.loads(ZSRE.read_text(encoding="utf-8").splitlines()[0])
    with pytest.raises(DatasetError, match=r"z.jsonl:1: field 'subject' \('Acme'\) does not occur in field 'src'"):
        load_cases(_write(tmp_path, "z.jsonl", [dict(z, subject="Acme")]))
    with pytest.raises(DatasetError, match=r"z2.jsonl:1: field 'answers'"):
        load_cases(_write(tmp_path, "z2.jsonl", [dict(z, answers="uniform")]))
    (tmp_path / "broken.jsonl").write_text(json.dumps(ke) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"broken.jsonl:2: not valid JSON"):
        load_cases(tmp_path / "broken.jsonl")
    with pytest.raises(DatasetError, match="unknown record layout"):
        load_cases(_write(tmp_path, "other.jsonl", [{"question": "?"}]))


def test_url_download_with_checksum(tmp_path):
    url = ORIGINAL.resolve().as_uri()  # file:// works offline, same code path as https://
    cache = tmp_path / "cache"
    good = sha256_of(ORIGINAL)
    path = resolve_dataset(url, sha256=good, cache_dir=cache)
    assert path.parent == cache and path.read_bytes() == ORIGINAL.read_bytes()
    assert load_cases(path)[0].case_id == 0
    with pytest.raises(DatasetError, match="SHA-256 is"):
        resolve_dataset(url, sha256="0" * 64, cache_dir=cache)
    assert not path.exists()  # a download that fails its checksum is not kept
    with pytest.raises(DatasetError, match="cannot download"):
        resolve_dataset((tmp_path / "missing.json").as_uri(), cache_dir=cache)
    with pytest.raises(DatasetError, match="dataset not found"):
        resolve_dataset(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_downstream_tasks_load_balanced(name):
    task = load_task(DATA / "downstream", name, n=8, shots=3)
    k = len(task.spec.labels)
    labels = [l for _, l in task.examples]
    assert len(labels) == 8 and max(labels.count(c) for c in range(k)) - min(labels.count(c) for c in range(k)) <= 1
    assert len(task.demos) == 3 and not set(task.demos) & set(task.examples)
    prompts = task_prompts(task)
    assert prompts[0].count("Answer:" if name != "sst2" else "Sentiment:") == 4  # 3 demos + the question


def test_downstream_malformed_label(tmp_path):
    (tmp_path / "sst2.jsonl").write_text(json.dumps({"sentence": "good", "label": 1}) + "\n"
                                         + json.dumps({"sentence": "bad", "label": "neg"}) + "\n")
    with pytest.raises(DatasetError, match=r"sst2.jsonl:2: field 'label'"):
        load_task(tmp_path, "sst2", n=1, shots=0)
