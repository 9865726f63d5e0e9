"""The run's configuration: the typed schema (:mod:`plmetric.config.schema`) and the presets.

The schema's method sections are the option classes of :mod:`plmetric.core.options`; its checks
read the names that the lower layers register (data sets, backbones, selection rules, methods).
The presets (``plmetric/config/presets/*.yaml``) ship inside the package: ``--config cub200`` names
one, ``--config path/to/file.yaml`` reads a file.

May import: :mod:`plmetric.core`, :mod:`plmetric.manifold`, :mod:`plmetric.data`,
:mod:`plmetric.evaluation`.
"""

from plmetric.config.schema import (
    Config,
    from_dict,
    load_config,
    preset_names,
    read_config_source,
    save_config,
    set_value,
    valid_keys,
)

__all__ = [
    "Config",
    "from_dict",
    "load_config",
    "preset_names",
    "read_config_source",
    "save_config",
    "set_value",
    "valid_keys",
]
