"""``bnrs study``: answer the batch-norm and dropout questions with evidence, on real data.

Each question (:mod:`bnrs.study.questions`) compares network variants that differ only in
the factor studied, over several seeds, with paired statistics (:mod:`bnrs.study.stats`).
Runs (:mod:`bnrs.study.train`) are independent joblib jobs (:mod:`bnrs.study.runner`),
each stored at once in an SQLite database (:mod:`bnrs.study.storage`), so a study resumes
after an interruption; the report (:mod:`bnrs.study.report`) is built from the database:
the results table, verdicts and summaries (:mod:`bnrs.study.results`), drawn by
:mod:`bnrs.study.plots` and written out as tables and text by the report.

Imports flow one way, each module importing only those before it::

    questions, stats, storage, train  ->  results  ->  plots  ->  report  ->  runner

(``runner`` plans and runs a study and then calls the report; nothing imports it but
this package and the command line).

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
