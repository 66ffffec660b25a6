"""Configuration: ``load_config(path)`` gives a frozen ``Config`` or raises ``ConfigError``."""

from relay.config.checks import check_config
from relay.config.fields import parse_duration
from relay.config.load import load_config, parse_config, validate_config
from relay.config.schema import (
    AjoConfig,
    BasicAuth,
    BearerAuth,
    Config,
    DeliveryConfig,
    Destination,
    HealthConfig,
    HmacAuth,
    JsonBody,
    JwtAuth,
    NoAuth,
    OAuth2Auth,
    RateLimit,
    RawBody,
    ServerConfig,
    SpoolConfig,
    TemplateConfig,
    TemplateVariant,
    TlsConfig,
    split_listen,
)

__all__ = [
    "AjoConfig", "BasicAuth", "BearerAuth", "Config", "DeliveryConfig",
    "Destination", "HealthConfig", "HmacAuth", "JsonBody", "JwtAuth", "NoAuth",
    "OAuth2Auth", "RateLimit", "RawBody",
    "ServerConfig", "SpoolConfig", "TemplateConfig", "TemplateVariant", "TlsConfig",
    "check_config", "load_config", "parse_config", "parse_duration", "split_listen",
    "validate_config",
]
