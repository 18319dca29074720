"""mdt-broker: a consent-aware information-sharing broker for CSEC multidisciplinary teams."""

__version__ = "0.1.0"
