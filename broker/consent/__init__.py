"""Consents and authorizations: validated against the legal form they take, stored, revoked."""

from broker.consent.validation import ValidatedConsent, YouthFacts, validate_consent

__all__ = ["ValidatedConsent", "YouthFacts", "validate_consent"]
