"""The README's contract tables are generated from featurizers/core/contracts.py and must stay identical."""
from pathlib import Path

from featurizers.core.contracts import readme_contracts
from pipelines.sample_catalog import describe_rule

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_contract_tables_match_the_code():
    text = README.read_text()
    begin, end = "<!-- contracts:begin -->", "<!-- contracts:end -->"
    section = text[text.index(begin) + len(begin): text.index(end)].strip()
    assert section == readme_contracts().strip(), "regenerate with `python -m featurizers.core.contracts`"


def test_readme_documents_the_synthetic_rule():
    rule_body = describe_rule().split("\n", 1)[1].strip()
    assert rule_body in README.read_text()
