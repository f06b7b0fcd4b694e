"""The configs `python -m vqlc.main --config=...` runs: each module's get_config(variant).

Addressed by file path (--config=vqlc/configs/imagenet_lc.py:eval) or, from an installed
package, by name (--config=imagenet_lc:eval); vqlc.cli resolves the name to this folder."""
