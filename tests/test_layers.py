"""The import contracts of .importlinter (what tests/run.sh checks with lint-imports
before the tests) hold for the package, and break, with import-linter's own message,
when one import that the layers forbid is added to the package's import graph."""

from pathlib import Path

import pytest
from importlinter import api  # noqa: F401  (configures import-linter's settings)
from importlinter.application import use_cases
from importlinter.application.app_config import settings

CONTRACTS = str(Path(__file__).resolve().parent.parent / ".importlinter")


class GraphWithImport:
    """import-linter's graph builder, plus one import added to what it finds."""

    def __init__(self, builder, importer: str, imported: str) -> None:
        self.builder, self.importer, self.imported = builder, importer, imported

    def build(self, **options):
        graph = self.builder.build(**options)
        graph.add_import(
            importer=self.importer,
            imported=self.imported,
            line_number=1,
            line_contents=f"import {self.imported}",
        )
        return graph


def lint(monkeypatch, added: tuple[str, str] | None = None) -> bool:
    if added:
        monkeypatch.setitem(
            settings._config, "GRAPH_BUILDER", GraphWithImport(settings.GRAPH_BUILDER, *added)
        )
    return use_cases.lint_imports(CONTRACTS, cache_dir=None, no_logo=True)


def test_the_package_keeps_its_contracts(monkeypatch, capsys):
    assert lint(monkeypatch), capsys.readouterr().out
    assert "2 kept, 0 broken" in capsys.readouterr().out


@pytest.mark.parametrize(
    "importer, imported, message",
    [
        # the engine reaching up to the profiler (what engine/module.py once did)
        (
            "pp_ext.engine.module",
            "pp_ext.bench.profiler",
            "pp_ext.engine is not allowed to import pp_ext.bench",
        ),
        # the schedule layer reaching up to test support (and, through it, to torch: both contracts break)
        (
            "pp_ext.schedules.render",
            "pp_ext.testing.spawn",
            "pp_ext.schedules is not allowed to import pp_ext.testing",
        ),
        # two packages of one layer that stay independent of each other
        (
            "pp_ext.checkpoint.tags",
            "pp_ext.data.records",
            "pp_ext.checkpoint is not allowed to import pp_ext.data",
        ),
        # the model adapter reaching for test support
        (
            "pp_ext.hf.loading",
            "pp_ext.testing.tiny",
            "pp_ext.hf is not allowed to import pp_ext.testing",
        ),
        # torch in the pure cost model
        (
            "pp_ext.schedules.cost_model",
            "torch",
            "pp_ext.schedules is not allowed to import torch: - pp_ext.schedules.cost_model -> torch",
        ),
    ],
)
def test_a_forbidden_import_breaks_a_contract(monkeypatch, capsys, importer, imported, message):
    assert not lint(monkeypatch, (importer, imported))
    out = " ".join(capsys.readouterr().out.split())
    assert message in out, out
