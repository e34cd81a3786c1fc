"""``python -m derm_accel`` runs the CLI, so ``accelerate launch -m derm_accel train ...`` works."""

from derm_accel.cli import app

if __name__ == "__main__":
    app(prog_name="derm-accel")
