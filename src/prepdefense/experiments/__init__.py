"""The paper's evaluation (Section 6) and the demo, as plan -> run -> store -> report.

One module per experiment (``table1``, ``standard_attacks``, ``delta_sweep``, ``fig4``,
``table5``, ``table6``, ``learned``, ``strong``), listed in ``registry``; ``reproduce`` is the
driver, ``store`` the resumable results, ``report`` the Markdown report. Nothing is imported
here, so importing one module does not import them all.
"""
