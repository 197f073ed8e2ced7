"""The layout x feature declaration (coap_dist/distributed/support.py) is complete, its
refusals say what to do instead, and the README shows the table generated from it."""

from __future__ import annotations

from pathlib import Path

from coap_dist.distributed import support


def test_every_cell_is_declared_and_the_readme_shows_the_generated_table() -> None:
    for layout in support.LAYOUTS:
        cells = support.SUPPORT[layout]
        assert set(cells) == set(support.FEATURES), layout
        for feature, cell in cells.items():
            assert cell.status in ("tested", "refused", "untested"), (layout, feature)
            if cell.status == "tested":
                path = Path(__file__).resolve().parents[1] / cell.note.split(" ")[0]
                assert path.is_file(), (layout, feature, cell.note)
            if cell.status == "refused":
                assert " use " in cell.note or "instead" in cell.note, (layout, feature)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert support.markdown() in readme
