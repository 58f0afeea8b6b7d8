"""A custom grader for polite.toml: graders are called as fn(output, sample, **options)."""


def says_please(output, sample, word="please"):
    found = word in output.lower()
    return (1.0 if found else 0.0), (f"says {word!r}" if found else f"never says {word!r}")
