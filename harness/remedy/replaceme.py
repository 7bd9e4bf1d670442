"""remedy=replaceme: the depth track's linear replacement of a removed run of blocks. The
fit and the fold are harness/depth/replaceme.py; this entry registers the name (with its check)
so that one `remedy=` group serves every track."""

from __future__ import annotations

from harness.checks import ConfigError
from harness.remedy import Remedy, register
from harness.settings import PruneSettings


@register("replaceme")
class ReplaceMe(Remedy):
    params = ("damp",)

    @classmethod
    def check(cls, settings: PruneSettings) -> None:
        if settings.sparsity_type != "depth":
            raise ConfigError(f"remedy=replaceme replaces removed blocks; with sparsity_type={settings.sparsity_type} "
                              "accepted: bias, recovery, none (or sparsity_type=depth)")
        if settings.damp < 0:
            raise ConfigError(f"remedy.damp={settings.damp!r}; accepted: a number >= 0 (0: the reference's least squares)")
