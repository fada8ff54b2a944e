"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``): the messages
generated from ``oip.proto`` (``make protos``), their translation to the data plane's types,
and the server."""
