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


def test_one_vocabulary_of_layouts() -> None:
    """Every layout's ``name``, the memory estimator's layouts, the support rows and the
    app's strategies use the words of ``LAYOUT_NAMES`` (instances bound to nothing: names
    are class or constructor facts)."""
    from coap_dist.distributed import Fsdp2Local, Fsdp2Owner, OwnerLayout
    from coap_dist.distributed.fsdp1 import Fsdp1View
    from coap_dist.distributed.views import ReplicatedView
    from coap_dist.integrations.deepspeed import DeepSpeedZero3View, DeepSpeedZeroView
    from coap_dist.memory import LAYOUTS as ESTIMATED
    from coap_dist.optim.layout import LAYOUT_NAMES
    from coap_dist.train.config import STRATEGIES

    names = {
        OwnerLayout(ReplicatedView(solo=True)).name: "replicated",
        OwnerLayout(ReplicatedView(solo=False)).name: "ddp_owner",  # OwnerSharding's view
        Fsdp2Local().name: "fsdp2",
        Fsdp2Owner().name: "fsdp2_owner",
        Fsdp1View.name: "fsdp1",
        DeepSpeedZeroView.name: "zero",
        DeepSpeedZero3View.name: "zero",
    }
    assert all(k == v for k, v in names.items()), names
    assert set(names.values()) == set(LAYOUT_NAMES)
    assert set(ESTIMATED) <= set(LAYOUT_NAMES)
    assert set(support.LAYOUTS) == (set(LAYOUT_NAMES) - {"replicated"}) | set(
        support.REPLICATED_ROUTES
    )
    assert {"ddp_owner", "fsdp2"} <= set(STRATEGIES)
