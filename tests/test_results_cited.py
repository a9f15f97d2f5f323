"""Every results file the READMEs and docs/ cite exists in the repository.

The results were reorganised once (one folder per data set, pilots/ and parts/ beside the
headlines); a figure whose file is gone cannot be checked by anyone, so a citation that points
nowhere must fail here rather than be found by a reader. Paths appear in two forms,
repo-relative (``benchmarks/results/x.json``) and relative to benchmarks/ (``results/x.json``,
in benchmarks/README.md), and in shorthand: ``headline-e10.{json,png}``, ``-s{0..4}.json``,
``speedup-ffcv-full-final1.*``. Each form is expanded before it is looked up.
"""
from __future__ import annotations

import glob
import itertools
import os
import re
from typing import Iterator, List

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The documents whose citations are checked (docs/*.md is globbed).
DOCUMENTS = ("README.md", "benchmarks/README.md", "benchmarks/results/README.md",
             "examples/README.md")

#: Outputs a command writes when run, not results kept in the repository: naming them is not
#: citing a record. ``make gpu-check`` has not been run on a GPU machine yet; it writes into
#: benchmarks/results/gpu-check/.
OUTPUTS = {"benchmarks/results/gpu-check/gpu_check.json",
           "benchmarks/results/gpu-check/gpu_check.log"}

EXTENSIONS = (".json", ".png", ".log", ".npz", ".md")

#: ``results/`` then path characters; braces and ``*`` are expanded below. A ``$`` (a shell
#: variable in a command template) ends the match, so templates are not read as citations.
CITATION = re.compile(r"(?<![\w/.-])((?:benchmarks/)?results/[\w./{},*-]+)")

#: The index (benchmarks/results/README.md) names its files relative to its own folder:
#: ``fashion-mnist/headline.json``. Any such path there (one with a folder) is checked too:
#: under benchmarks/results/ when its first folder is there, else from the repository root
#: (``docs/design.md``), so a misspelt folder is reported rather than skipped.
INDEX = "benchmarks/results/README.md"
INDEX_CITATION = re.compile(r"(?<![\w/.-])([\w{},-][\w.{},*-]*/[\w./{},*-]+)")


def expand_braces(path: str) -> List[str]:
    """``a.{json,png}`` -> a.json, a.png; ``s{0..4}`` -> s0 ... s4; several groups multiply."""
    groups = re.findall(r"\{([^{}]*)\}", path)
    if not groups:
        return [path]
    choices = []
    for group in groups:
        span = re.fullmatch(r"(\d+)\.\.(\d+)", group)
        choices.append([str(i) for i in range(int(span[1]), int(span[2]) + 1)] if span
                       else group.split(","))
    template = re.sub(r"\{[^{}]*\}", "{}", path)
    return [template.format(*pick) for pick in itertools.product(*choices)]


def citations(text: str, document: str = "") -> Iterator[str]:
    """Every results file a text cites, as a repo-relative path (braces expanded, a ``*``
    left for the glob). ``results/...`` means benchmarks/results/..., the form
    benchmarks/README.md uses. Folders (``results/cifar10/``) are not files and are skipped."""
    found = [("", m.group(1)) for m in CITATION.finditer(text)]
    if document == INDEX:
        for m in INDEX_CITATION.finditer(text):
            path = m.group(1)
            if path.startswith(("results/", "benchmarks/")):
                continue
            top = path.split("/", 1)[0]
            in_results = os.path.isdir(os.path.join(REPO, "benchmarks", "results", top))
            at_root = os.path.isdir(os.path.join(REPO, top))
            found.append(("" if at_root and not in_results else "benchmarks/results/", path))
    for base, raw in found:
        raw = raw.rstrip(".,")
        for path in expand_braces(raw):
            if not (path.endswith(EXTENSIONS) or path.endswith(".*")):
                continue
            if base or path.startswith("benchmarks/") or not path.startswith("results/"):
                yield base + path
            else:
                yield "benchmarks/" + path


def exists(path: str) -> bool:
    if "*" in path:
        return bool(glob.glob(os.path.join(REPO, path)))
    return os.path.isfile(os.path.join(REPO, path))


def documents() -> List[str]:
    docs = [d for d in DOCUMENTS if os.path.isfile(os.path.join(REPO, d))]
    docs += sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
    return docs


def missing_citations(document: str, text: str) -> List[str]:
    """Every cited results file (repo-relative) that does not exist."""
    return [path for path in citations(text, document)
            if path not in OUTPUTS and not exists(path)]


def test_the_expected_documents_are_checked():
    docs = documents()
    for required in ("README.md", "benchmarks/README.md", "benchmarks/results/README.md"):
        assert required in docs
    assert any(d.startswith("docs/") for d in docs)


@pytest.mark.parametrize("document", documents())
def test_every_cited_results_file_exists(document):
    with open(os.path.join(REPO, document), encoding="utf-8") as f:
        text = f.read()
    missing = missing_citations(document, text)
    assert not missing, f"{document} cites files not in the repository:\n  " + \
        "\n  ".join(missing)


def test_the_readmes_cite_results_at_all():
    """A parser that finds nothing would pass everything: the main READMEs cite dozens."""
    for document in ("README.md", "benchmarks/README.md"):
        with open(os.path.join(REPO, document), encoding="utf-8") as f:
            assert len(list(citations(f.read(), document))) >= 3, document


def test_a_missing_file_is_caught_in_every_form():
    """The checker itself: each citation form of a file that does not exist is reported,
    each form of one that does is not."""
    real = "benchmarks/results/cifar10/headline-e10.json"
    assert os.path.isfile(os.path.join(REPO, real))
    good = ("`benchmarks/results/cifar10/headline-e10.{json,png}` and "
            "(`results/cifar10/headline-e10.json`), `results/cifar10/parts/headline-e10-s*.json`.")
    assert missing_citations("scratch.md", good) == []
    bad = ("`benchmarks/results/cifar10/no-such-run.json`, `results/no-such-run.png`, "
           "`results/cifar10/headline-e10.{json,log}` and `results/nothing-like-this-*.*`.")
    assert missing_citations("scratch.md", bad) == [
        "benchmarks/results/cifar10/no-such-run.json", "benchmarks/results/no-such-run.png",
        "benchmarks/results/cifar10/headline-e10.log",
        "benchmarks/results/nothing-like-this-*.*"]
    # the index names files relative to its own folder; elsewhere such a path is not a citation
    index_bad = "`cifar10/headline-e10.json` and `cifar10/no-such-run.png`"
    assert missing_citations(INDEX, index_bad) == ["benchmarks/results/cifar10/no-such-run.png"]
    assert missing_citations(INDEX, "`docs/design.md`, `cifar-10/headline-e10.json`") == [
        "benchmarks/results/cifar-10/headline-e10.json"]
    assert missing_citations("README.md", index_bad) == []


def test_braces_expand_lists_and_ranges():
    assert expand_braces("a-s{0..2}.{json,png}") == [
        "a-s0.json", "a-s0.png", "a-s1.json", "a-s1.png", "a-s2.json", "a-s2.png"]
    assert expand_braces("plain.json") == ["plain.json"]
