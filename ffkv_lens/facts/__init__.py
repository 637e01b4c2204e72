"""Facts folders: a fact file located, verified and edited on one model (``ffkv-lens locate``; docs/causal.md).

- :mod:`.folder`: :func:`write_facts_folder`, the tables, the figure and the manifest;
- :mod:`.html`: the folder's ``report.html``.
"""

from ffkv_lens.facts.folder import FACTS_FORMAT, LocateSettings, write_facts_folder

__all__ = ["FACTS_FORMAT", "LocateSettings", "write_facts_folder"]
