"""The configuration file: one YAML document, overridable from the environment.

Parsing is strict (unknown keys are refused, with a suggestion) and every
problem is reported at once, each with its YAML path and its line, or the
environment variable that set the value, because an operator fixing a config
by trial and error one message at a time gives up.

Secrets are never part of the parsed model: the file names an environment
variable (`*_env`) or a file (`*_file`), read only when a connection is made
(`SiteEndpoint.from_config`, `SiteConfig.webhook_token`, `MqttConfig.password`),
so `check --offline` works in CI without them and no error or dump can leak one.

The modules, lowest first: `types` (value types: names, durations, URLs,
globs, cron), `secrets` (secret references), `report` (problems and the error
listing them), `cross` (checks spanning sections), `models` (the sections),
`env` (environment overrides), `yamlfile` (the file and its line map), `load`
(all of it together). Everything callers need is importable from here.
"""

from replicator.config.env import CONFIG_ENV, ENV_PREFIX
from replicator.config.load import add_config_argument, config_from_dict, load_config
from replicator.config.models import (
    AuthConfig,
    Config,
    GcConfig,
    GcPolicy,
    KeepConfig,
    LimitsConfig,
    MqttConfig,
    RenameConfig,
    Rule,
    SiteConfig,
    TagFilter,
    TelemetryConfig,
    TLSConfig,
)
from replicator.config.report import InvalidConfig, format_path
from replicator.config.secrets import read_secret
from replicator.config.types import split_host_port

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "AuthConfig",
    "Config",
    "GcConfig",
    "GcPolicy",
    "InvalidConfig",
    "KeepConfig",
    "LimitsConfig",
    "MqttConfig",
    "RenameConfig",
    "Rule",
    "SiteConfig",
    "TLSConfig",
    "TagFilter",
    "TelemetryConfig",
    "add_config_argument",
    "config_from_dict",
    "format_path",
    "load_config",
    "read_secret",
    "split_host_port",
]
