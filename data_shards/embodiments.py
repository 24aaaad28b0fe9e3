"""Embodiment ids: the one table the episode format, the data pipeline and the model share.

Imports nothing (of the project or beyond), so that any layer -- the model's per-embodiment loss
logging included -- can read it without pulling in the shard code (JPEG, PIL, tar).
"""

# Stable integer ids for embodiments (the model's embodiment embedding / per-embodiment logging).
# robot/joint: imported robot data without end-effector poses (absolute joint-space actions in the
# dataset's own dim order; data_shards/import_lerobot.py), kept apart from the EE embodiments.
EMBODIMENT_IDS = {"robot/arm": 0, "human/ego": 1, "robot/bimanual": 2, "robot/joint": 3}
