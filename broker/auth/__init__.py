"""Authentication (pipeline step 1): broker signing key, access tokens, client assertions.

The JOSE work is done with ``joserfc``, authlib's successor library (``authlib.jose`` is
deprecated in authlib 1.9 and warns on import); it is installed as an authlib dependency.
"""

from broker.auth.keys import BrokerKey, SigningKeyError, generate_private_key_pem, load_signing_key
from broker.auth.tokens import AuthError, ExternalJwks, TokenIssuer, TokenVerifier

__all__ = [
    "AuthError",
    "BrokerKey",
    "ExternalJwks",
    "SigningKeyError",
    "TokenIssuer",
    "TokenVerifier",
    "generate_private_key_pem",
    "load_signing_key",
]
