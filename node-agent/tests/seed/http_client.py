import requests

def add(a, b):
    url = f"http://0.0.0.0:5000/add?a={a}&b={b}"
    response = requests.get(url)
    return response.json()["result"]

result = add(1, 2)
print(f"Result: {result}")
