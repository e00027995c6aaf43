"""Storage backends, chosen by URL scheme, imported lazily so that cloud SDKs load only when used."""
