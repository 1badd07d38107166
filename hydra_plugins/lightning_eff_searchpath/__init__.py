"""Hydra plugin: makes lightning_eff's config groups available to any Hydra app as `lightning_eff/<group>`."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LightningEffSearchPathPlugin(SearchPathPlugin):
    """Registers the groups in Hydra's ConfigStore (always on the search path) when Hydra starts."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from lightning_eff.hydra_config import register_config_groups

        register_config_groups()
