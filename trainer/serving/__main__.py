from trainer.serving.main import main

main()
