"""Fuzzing request validation and request files: only RequestError, never anything else."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from factedit.core.errors import RequestError
from factedit.core.request_files import request_from_record
from factedit.core.requests import Request

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30) | st.sampled_from(
    ["{}", "{} is in", " ", "", "{}{}", "The {} of", "Paris"])


@settings(max_examples=300, deadline=None)
@given(text, text, text, st.none() | text)
def test_request_validation_never_crashes(prompt, subject, target, true):
    try:
        r = Request(prompt, subject, target, true)
    except RequestError:
        return
    assert r.prompt.count("{}") == 1 and r.subject.strip() and r.target_new.strip()
    assert r.text == prompt.replace("{}", subject)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=4), max_leaves=10)
keys = st.sampled_from(["prompt", "subject", "target_new", "target_true", "ground_truth", "requested_rewrite", "str"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, json_values | text, max_size=6) | json_values)
def test_records_never_crash(record):
    try:
        r = request_from_record(record, "rec")
    except RequestError as e:
        assert str(e).startswith("rec")
        return
    assert isinstance(r, Request)
    json.dumps(r.to_dict())
