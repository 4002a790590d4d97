"""Reading history back: replay of a run's state at a point, and shadow runs of new code against recorded runs."""
