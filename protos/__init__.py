"""The wire: Cleave's protobuf services and the helpers that open them.

Generated code lives in :mod:`protos.cleave.v1` (regenerate with ``make protos``). This package also
holds what both daemons need to speak it: error-to-status mapping (:mod:`protos.errors`), channel
and server builders with health, reflection and draining (:mod:`protos.serving`).
"""
