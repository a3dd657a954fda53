"""Evaluations: graders that score a model's answers, and the retrieval metrics that score a
vector store's search, as plain Python (the API lives in `gateway`, the runs in `workers`)."""

from evals.graders import (
    Grade,
    Grader,
    GraderError,
    LabelModelGrader,
    ModelClient,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    grade,
    parse_criteria,
    parse_grader,
)
from evals.retrieval.metrics import (
    QuestionResult,
    RetrievalQuestion,
    RetrievalReport,
    evaluate_retrieval,
    parse_questions,
)

__all__ = [
    "Grade",
    "Grader",
    "GraderError",
    "LabelModelGrader",
    "ModelClient",
    "QuestionResult",
    "RetrievalQuestion",
    "RetrievalReport",
    "ScoreModelGrader",
    "StringCheckGrader",
    "TextSimilarityGrader",
    "evaluate_retrieval",
    "grade",
    "parse_criteria",
    "parse_grader",
    "parse_questions",
]
