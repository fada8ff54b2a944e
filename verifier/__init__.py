"""Offline training and evaluation for Fides Gateway: data sets, losses (KD, FKL, RKL, JSD,
TVD), teacher and distilled service-student training, GDTL verifiers, ONNX export with model
cards (``fides train``), attacks, the GAN-trained detector, the re-classifier and the novelty
check (``fides evaluate``), DistillSpec (docs/training.md, docs/evaluation.md). The gateway never
imports it (`make lint` holds that); ``fides`` (the CLI and the default builders) does."""
