"""What a recipe is: its parsing, its steps (the glue to the methods) and the step registry."""
