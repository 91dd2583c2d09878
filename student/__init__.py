"""The student track: write the core of SRPO yourself (core.py), grade it (`make grade`: test_grade.py through
adapters.py), then train the toy with it (switch.py, `STUDENT=1`). See README.md."""
