"""HTTP routes: thin, each one hands its request to the pipeline."""
