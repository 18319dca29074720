"""Generate the OpenAPI document without a database, keys or sources."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def generate() -> dict:
    """The app's OpenAPI document, built from a throwaway demo-mode runtime."""
    from broker.app import create_app
    from broker.auth.keys import generate_private_key_pem
    from broker.settings import REPO_POLICY_DIR, Settings
    from broker.store.db import upgrade

    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key.pem"
        key.write_bytes(generate_private_key_pem("EC"))
        key.chmod(0o600)
        url = f"sqlite:///{tmp}/openapi.sqlite"
        upgrade(url)
        settings = Settings(mode="production", database_url=url, public_url="http://127.0.0.1:8000",
                            issuer="http://127.0.0.1:8000", signing_key_file=key, policy_dir=REPO_POLICY_DIR)
        app = create_app(settings)
        doc = app.openapi()
        app.state.runtime.engine.dispose()
        return json.loads(json.dumps(doc))


def main() -> None:
    """Print the document (``broker openapi > openapi/openapi.json``)."""
    print(json.dumps(generate(), indent=2, sort_keys=True))
