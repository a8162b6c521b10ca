from lib.trainers.one_shot import OneShotTrain

__all__ = ["OneShotTrain"]
