"""Data shipped inside the package: the default training corpus of ``coap_dist.train``.

``shakespeare.tar.gz`` holds 21 public-domain Shakespeare texts (about 2.7 MB of ASCII);
``PROVENANCE.md`` says where they come from and how the archive was made. The loaders live in
:mod:`coap_dist.train.data`.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SHAKESPEARE_ARCHIVE = "shakespeare.tar.gz"


def shakespeare_archive() -> Traversable:
    """The packaged archive ``coap_dist/data/shakespeare.tar.gz`` as a readable resource."""
    return resources.files(__name__).joinpath(SHAKESPEARE_ARCHIVE)
