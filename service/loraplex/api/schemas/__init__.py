"""Wire formats: OpenAI (`openai.py`), TGI/LoRAX (`tgi.py`) and the shared error envelope (`errors.py`)."""
