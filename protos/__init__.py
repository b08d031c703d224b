"""The wire: Cleave's protobuf services and the helpers that open them.

Generated code lives in :mod:`protos.cleave.v1` (regenerate with ``make protos``). This package also
holds the error-to-status mapping every servicer and client shares (:mod:`protos.errors`) and the stub
generator (:mod:`protos.generate`). Servers, channels, TLS and metrics live in :mod:`runtime`.
"""
