"""``bnrs study``: answer the batch-norm and dropout questions with evidence, on real data.

Each question (:mod:`bnrs.study.questions`) compares network variants that differ only in
the factor studied, over several seeds, with paired statistics (:mod:`bnrs.study.stats`).
Runs (:mod:`bnrs.study.train`) are independent joblib jobs (:mod:`bnrs.study.runner`),
each stored at once in an SQLite database (:mod:`bnrs.study.storage`), so a study resumes
after an interruption; the report (:mod:`bnrs.study.report`) is built from the database.

Examples
--------
>>> import bnrs.study
>>> table = bnrs.study.run(questions=[1], dataset="digits", quick=True,
...                        out="study-out")                        # doctest: +SKIP
>>> table.verdicts[0]["verdict"]                                   # doctest: +SKIP
'supported'
"""

from .questions import QUESTIONS, Claim, Question, Variant, question
from .results import ResultTable
from .runner import run

__all__ = ["QUESTIONS", "Claim", "Question", "ResultTable", "Variant", "question", "run"]
