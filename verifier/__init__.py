"""Offline training and evaluation: data, losses, teacher/student training, GDTL, attacks,
detector and re-classifier. Filled by the verifier issues; nothing here is imported by the
gateway at serving time."""
