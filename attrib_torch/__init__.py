"""attrib_torch: AttributionTask and the attributor classes users hold.

Thin wrappers over :mod:`attrib_core` and :mod:`kernels` with the class names,
constructor arguments and defaults of dattri, so a user switches by changing an
import. One deliberate difference: loss and target functions receive batches
with their batch dimension, and never need ``unsqueeze(0)``.
"""

from .base import BaseAttributor, BaseInnerProductAttributor
from .gradient_computers import (
    AbstractGradientComputer,
    AbstractModelOutput,
    FunctionalGradientComputer,
    ImageClassificationModelOutput,
    IterativeGradientComputer,
)
from .influence import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from .influence_legacy import IFAttributor
from .layer_ablation import LayerFeatureAblation
from .lm import CausalLMLoss, QueryTokens, SequenceClassificationLoss
from .logra import LoGraAttributor, TokenScores
from .rps import RPSAttributor
from .store import FeatureStore, StoreCorrupted, StoreMismatch, StoreWriter, build_store
from .training_capture import GradientRecorder, attribute_recorded
from .task import AttributionTask
from .tracin import TracInAttributor
from .tracincp import KMostInfluentialResults, TracInCP, TracInCPFast, TracInCPFastRandProj
from .trak import TRAKAttributor

__all__ = [
    "AttributionTask",
    "FeatureStore",
    "StoreCorrupted",
    "StoreMismatch",
    "build_store",
    "StoreWriter",
    "GradientRecorder",
    "attribute_recorded",
    "CausalLMLoss",
    "QueryTokens",
    "SequenceClassificationLoss",
    "BaseAttributor",
    "BaseInnerProductAttributor",
    "IFAttributor",
    "IFAttributorExplicit",
    "IFAttributorCG",
    "IFAttributorLiSSA",
    "IFAttributorDataInf",
    "IFAttributorArnoldi",
    "IFAttributorEKFAC",
    "TracInAttributor",
    "LoGraAttributor",
    "TokenScores",
    "TracInCP",
    "TracInCPFast",
    "TracInCPFastRandProj",
    "KMostInfluentialResults",
    "LayerFeatureAblation",
    "TRAKAttributor",
    "RPSAttributor",
    "AbstractModelOutput",
    "ImageClassificationModelOutput",
    "AbstractGradientComputer",
    "FunctionalGradientComputer",
    "IterativeGradientComputer",
]
