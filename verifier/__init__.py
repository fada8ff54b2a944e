"""Offline training for Fides Gateway: data sets, losses (KD, FKL, RKL, JSD, TVD), teacher
and distilled service-student training, GDTL verifiers, ONNX export with model cards
(``fides train EXPERIMENT.yaml``; see verifier/README.md). Later issues add attacks, the
detector and re-classifier, and DistillSpec. Nothing here is imported by the gateway at
serving time (only ``fides models build-default`` and ``fides train`` use it)."""
